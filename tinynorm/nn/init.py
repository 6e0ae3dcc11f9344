"""Seeded weight initializations.

``fan_in = C_in * kh * kw`` and ``fan_out = C_out * kh * kw`` for conv weights
(C_out, C_in, kh, kw); ``fan_in = D_in``, ``fan_out = D_out`` for linear
weights (D_out, D_in).

=============  ===========================================  =====================
name           distribution                                 E ||W_j||^2
=============  ===========================================  =====================
caffe_xavier   U(-sqrt(3 / fan_in), sqrt(3 / fan_in))       1
glorot         U(-sqrt(6 / (fan_in + fan_out)), ...)        2 fan_in / (fan_in + fan_out)
he             N(0, 2 / fan_in)                             2
orthogonal     Q of the QR of a Gaussian (fan_out, fan_in)  min(1, fan_in / fan_out)
               matrix: every singular value 1
=============  ===========================================  =====================

``caffe_xavier`` is the default everywhere (layers, model builders, the
trainer's configuration, every experiment preset): the paper trained in
(NVIDIA) Caffe, whose ``xavier`` filler draws U(-sqrt(3/n), sqrt(3/n)) with
n = fan_in (``FillerParameter.variance_norm`` defaults to ``FAN_IN``), so every
filter j starts with ||W_j|| close to 1 and a layer keeps the variance of
unit-variance inputs.  Glorot & Bengio's (2010) average of the fans is a
different init: ||W_j||^2 = 0.046 for cifar10-nv's 3-channel conv1 at width
0.25, 0.4 for ResNet's expanding 1x1 convs.  Run logs written before
``caffe_xavier`` existed say ``xavier``, which meant ``glorot``
(see :func:`tinynorm.train.read_log`).

``orthogonal`` is Saxe et al.'s (2014) exact orthogonal init, as
``torch.nn.init.orthogonal_`` draws it: the (fan_out, fan_in) matrix has
orthonormal rows (fan_out <= fan_in) or columns, so that a product of square
layers is orthogonal too -- what deep linear networks need to keep their
end-to-end gain at 1 whatever the depth, where Gaussian or uniform inits need
a width growing with depth.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fans", "caffe_xavier_uniform", "glorot_uniform", "he_normal", "orthogonal",
           "initialize", "INITS", "DEFAULT_INIT"]

DEFAULT_INIT = "caffe_xavier"


def fans(shape):
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def caffe_xavier_uniform(shape, rng, dtype=np.float32):
    """Caffe's ``xavier`` filler (variance_norm FAN_IN): U(-a, a), a = sqrt(3 / fan_in)."""
    fan_in, _ = fans(shape)
    a = np.sqrt(3.0 / fan_in)
    return rng.uniform(-a, a, size=shape).astype(dtype)


def glorot_uniform(shape, rng, dtype=np.float32):
    """Glorot & Bengio (2010): U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(dtype)


def he_normal(shape, rng, dtype=np.float32):
    """He et al. (2015): N(0, 2 / fan_in)."""
    fan_in, _ = fans(shape)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def orthogonal(shape, rng, dtype=np.float32):
    """Saxe et al. (2014): the weight as a (fan_out, fan_in) matrix with every
    singular value 1 (orthonormal rows when fan_out <= fan_in, else columns)."""
    fan_in, fan_out = fans(shape)
    rows, cols = shape[0], fan_in
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)                     # q: (max, min), orthonormal columns
    q *= np.sign(np.diag(r))                   # Haar-distributed (Mezzadri 2007)
    if rows < cols:
        q = q.T                                # (rows, cols): orthonormal rows
    return q.reshape(shape).astype(dtype)


INITS = {"caffe_xavier": caffe_xavier_uniform, "glorot": glorot_uniform, "he": he_normal,
         "orthogonal": orthogonal}


def initialize(name, shape, rng, dtype=np.float32):
    if name == "xavier":
        # two different inits go by this name; make the caller say which
        raise ValueError("init 'xavier' is ambiguous: use 'caffe_xavier' (Caffe's filler, "
                         "U(+-sqrt(3/fan_in)), the default) or 'glorot' "
                         "(U(+-sqrt(6/(fan_in+fan_out))))")
    try:
        return INITS[name](shape, rng, dtype)
    except KeyError:
        raise ValueError(f"unknown init {name!r}; choose from {sorted(INITS)}") from None

"""Softmax cross-entropy, averaged over the batch.

    loss = (1/N) sum_n [ logsumexp(z[n]) - z[n, labels[n]] ]
    dz   = (softmax(z) - onehot(labels)) / N

The log-sum-exp is taken after subtracting each row's maximum, so large
logits neither overflow nor lose the loss to round-off.  Computed in the
logits' dtype on their backend.
"""
from __future__ import annotations

import numpy as np

from .. import backend

__all__ = ["softmax_cross_entropy", "gradcheck_cases"]


def _check(logits, labels):
    if not backend.is_array(logits):
        raise ValueError(f"softmax_cross_entropy: logits must be a NumPy or CuPy array; "
                         f"got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: logits must be 2-D (N, classes); got "
                         f"shape {tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise ValueError(f"softmax_cross_entropy: logits must be floating point; got "
                         f"dtype {logits.dtype}")
    n, k = logits.shape
    if n == 0 or k == 0:
        raise ValueError(f"softmax_cross_entropy: empty logits of shape {(n, k)}")
    xp = backend.get_array_module(logits)
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"softmax_cross_entropy: labels must be integers; got dtype "
                         f"{labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"softmax_cross_entropy: labels must have shape ({n},) (one per "
                         f"row of logits); got {tuple(labels.shape)}")
    bad = (labels < 0) | (labels >= k)
    if bool(bad.any()):
        i = int(xp.argmax(bad))
        raise ValueError(f"softmax_cross_entropy: label out of range: labels[{i}] = "
                         f"{int(labels[i])}, expected 0 <= label < {k} (number of classes)")
    return xp, labels


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient.

    logits : (N, K) float;  labels : (N,) ints in [0, K)
    Returns ``(loss, dlogits)``: loss a scalar of the logits' dtype (a NumPy
    scalar, or a 0-d CuPy array -- ``float(loss)`` works for both);
    dlogits (N, K) = (softmax(logits) - onehot(labels)) / N.
    """
    xp, labels = _check(logits, labels)
    n = logits.shape[0]
    rows = xp.arange(n)
    # shifted: (N, K), each row's max subtracted, so exp() <= 1 and sum >= 1
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    loss = (xp.log(sum_exp[:, 0]) - shifted[rows, labels]).mean()
    dlogits = exp / sum_exp
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits


# softmax_cross_entropy already has the contract's (output, cache) shape, with
# dlogits as the cache; this is the matching backward for `tinynorm gradcheck`.

def _sce_backward(dloss, dlogits):
    """dlogits scaled by the upstream gradient of the (scalar) loss."""
    return (dlogits * dloss,)


def gradcheck_cases():
    rng = np.random.default_rng(4)
    cases = []
    # Moderate logits: the loss is one scalar, so central differences carry an
    # absolute round-off of ~1e-10 that tiny softmax entries cannot absorb.
    for n, k, scale in [(5, 4, 1.0), (1, 10, 1.0), (6, 3, 1.5)]:
        logits = rng.standard_normal((n, k)) * scale
        labels = rng.integers(0, k, size=n)
        cases.append((f"softmax_cross_entropy N={n} K={k} scale={scale:g}", softmax_cross_entropy,
                      _sce_backward, (logits, labels), ("logits", "labels")))
    return cases

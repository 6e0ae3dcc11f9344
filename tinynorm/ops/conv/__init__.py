"""2-D convolution (cross-correlation, as in every deep-learning library).

    y[n, o, oy, ox] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, oy*sh + i, ox*sw + j]

with ``x_pad`` the input zero-padded by ``ph`` rows / ``pw`` columns on each
side, OH = (H + 2ph - kh) // sh + 1 and OW likewise.

Shapes: x (N, C, H, W), w (C_out, C, kh, kw), b (C_out,) or None,
y (N, C_out, OH, OW).  ``stride`` and ``pad`` are ints or (h, w) pairs.

How it is computed.  One public selector, :func:`conv_plan`, chooses a
:class:`ConvPlan` -- the algorithm, the chunks of the batch and the pipeline
threads -- from the shapes, dtype and backend and the settings of
:mod:`tinynorm.settings`.  ``conv2d_forward`` records the plan in its cache;
the backward follows it (and runs under the settings it was made with), so a
change of settings between the two passes cannot mix algorithms::

    >>> from tinynorm import ops, settings
    >>> ops.conv_plan((128, 32, 28, 28), (32, 32, 3, 3), 1, 1)
    ConvPlan(winograd4: x (128, 32, 28, 28) float32, w (32, 32, 3, 3), stride 1, pad 1 -> 28x28; ...)
    >>> with settings.using(winograd_tile=2):
    ...     y, cache = ops.conv2d_forward(x, w, b, 1, 1)       # cache.plan.algorithm == 'winograd2'

The package, one module per algorithm:

* :mod:`.plan`      -- :class:`ConvPlan`, :func:`conv_plan`, the selection rules
  and the chunk sizing;
* :mod:`.pipeline`  -- per-thread workspaces, the NCHW <-> GEMM layout kernels,
  the batch pipeline (one thread per group of chunks, single-threaded
  kernels and BLAS, one join per pass) and the lowered-GEMM passes;
* :mod:`.im2col`    -- ``im2col``: any kernel / stride / pad on CPU, im2col + GEMM;
* :mod:`.pointwise` -- ``pointwise``: 1x1 / stride 1 / pad 0, GEMMs on NCHW;
* :mod:`.winograd`  -- ``winograd4`` / ``winograd2``: 3x3 / stride 1, one driver
  over the kernel modules :mod:`._winograd4` (F(4x4, 3x3)) and
  :mod:`._winograd2` (F(2x2, 3x3));
* :mod:`.cudnn`     -- ``cudnn``: CuPy arrays through cuDNN 9 by NVIDIA's cuDNN
  frontend Python package (never run on a GPU: written against its
  documented graph API); without it CuPy arrays take ``generic`` and the
  first such convolution warns once, naming the reason;
* :mod:`.generic`   -- ``generic``: array-generic im2col + matmul (the GPU
  fallback, ``use_numba`` off);
* :mod:`.onednn`    -- ``onednn``: float32 CPU arrays through Intel's oneDNN
  (optional; ``use_onednn``), in NCHW or channels-last memory;
* :mod:`.reference` -- the slow direct convolution the tests hold every plan to.

Every numba kernel runs through ``_kernels.launch``, which decides between
one thread and all of numba's threads (on a 2-core machine OpenBLAS's
spinning idle threads make a second numba thread a loss unless
``OPENBLAS_THREAD_TIMEOUT`` is set low).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ... import settings
from .. import layout
from . import cudnn, generic, im2col, onednn, pointwise, winograd
from .args import check_args, check_dy
from .pipeline import release_workspaces
from .plan import ALGORITHMS, ConvPlan, conv_plan, make_plan
from .reference import conv2d_reference_backward, conv2d_reference_forward

__all__ = [
    "conv2d_forward", "conv2d_backward", "conv2d_backward_data", "conv2d_backward_filter",
    "conv2d_reference_forward", "conv2d_reference_backward", "release_workspaces",
    "conv_plan", "ConvPlan", "gradcheck_cases",
]

# algorithm -> the module with its forward(x, w, b, plan) and
# backward(dy, x, w, plan, need_dx, need_dw, need_db)
_IMPLEMENTATIONS = {
    "winograd4": winograd, "winograd2": winograd, "pointwise": pointwise, "im2col": im2col,
    "cudnn": cudnn, "generic": generic, "onednn": onednn,
}
assert set(_IMPLEMENTATIONS) == set(ALGORITHMS)


_warned = set()      # the reasons a GPU convolution fell back to generic, warned once each


def _warn_fallback(plan):
    # one warning per reason (not per shape): "no cuDNN frontend" is said once
    reason = plan.reason.split(" of x ")[0] if plan.reason.startswith("cuDNN does not") \
        else plan.reason
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"tinynorm: GPU convolutions run im2col + matmul instead of cuDNN: "
                      f"{plan.reason}", RuntimeWarning, stacklevel=3)


class ConvCache(NamedTuple):
    """What ``conv2d_forward`` hands its backward: the input (a reference),
    the weight, whether there is a bias, the plan it ran, and whether the
    output is channels-last (:mod:`tinynorm.ops.layout`) and whether the input
    was (dx comes back in the input's layout)."""
    x: object
    w: object
    has_bias: bool
    plan: ConvPlan
    channels_last: bool = False
    input_channels_last: bool = False


def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """Convolution forward pass.

    Parameters
    ----------
    x : (N, C, H, W) float32 or float64, NumPy or CuPy
    w : (C_out, C, kh, kw), same dtype and backend as x
    b : (C_out,) or None
    stride, pad : int or (h, w) pair; stride >= 1, pad >= 0

    Returns
    -------
    y : (N, C_out, OH, OW), OH = (H + 2*ph - kh) // sh + 1; C-contiguous, or
        channels-last when x is or the ``channels_last`` setting asks (True;
        "auto", the default: where the plan is oneDNN's; NumPy arrays;
        :mod:`tinynorm.ops.layout`)
    cache : a :class:`ConvCache` for :func:`conv2d_backward`; ``cache.plan`` is
        the :class:`ConvPlan` that ran
    """
    xp, _, stride, pad, out_hw = check_args(x, w, b, stride, pad)
    plan = make_plan(tuple(x.shape), tuple(w.shape), stride, pad, out_hw, x.dtype,
                     gpu=xp is not np)
    if plan.fallback:
        _warn_fallback(plan)
    input_cl = layout.is_channels_last(x)
    native = plan.algorithm == "onednn"     # reads and writes channels-last memory itself
    # the output is channels-last when the input is, or when the channels_last
    # setting asks (a model's first convolution then converts its activations)
    want = plan.settings.channels_last
    channels_last = input_cl or (xp is np and (want is True or (want == "auto" and native)))
    if native and channels_last:
        x = layout.to_channels_last(x)
    else:
        x = xp.ascontiguousarray(x)         # cached for the backward, which wants it so
    y = _IMPLEMENTATIONS[plan.algorithm].forward(x, w, b, plan)
    if channels_last:
        y = layout.to_channels_last(y)      # no copy where the plan answered in it
    return y, ConvCache(x, w, b is not None, plan, channels_last, input_cl)


def _backward(dy, cache, need_dx, need_dw, need_db):
    x, w, _, plan, _, input_cl = cache
    check_dy(dy, x, w, plan.out_hw)
    with settings.using(plan.settings):
        dx, dw, db = _IMPLEMENTATIONS[plan.algorithm].backward(dy, x, w, plan, need_dx,
                                                               need_dw, need_db)
    if dx is not None:
        # in the layout the caller's x had (no copy where the plan answered in it)
        dx = layout.to_channels_last(dx) if input_cl else layout.to_nchw(dx)
    return dx, dw, db


def conv2d_backward(dy, cache):
    """Convolution backward pass: ``(dx, dw, db)``; ``db`` is None without bias.

    With col = im2col(x) (K, N*P), K = C*kh*kw, P = OH*OW, and dY = dy laid
    out as (C_out, N*P)::

        dw  = dY @ col.T                      reshaped to (C_out, C, kh, kw)
        dx  = col2im(w2.T @ dY)               w2 = w reshaped to (C_out, K)
        db  = sum_{n, oy, ox} dy[n, :, oy, ox]

    i.e. dx[n, c, h, v] = sum_{o, i, j} w[o, c, i, j] * dy[n, o, oy, ox] over the
    (oy, ox) whose window covers input pixel (h, v) at offset (i, j).  Every
    plan computes these (Winograd as the exact transposes of its forward maps).

    dy : (N, C_out, OH, OW); returns dx (N, C, H, W), dw like w, db (C_out,) or None.
    """
    return _backward(dy, cache, need_dx=True, need_dw=True, need_db=cache.has_bias)


def conv2d_backward_data(dy, cache):
    """Only the input gradient ``dx = col2im(w2.T @ dY)`` (see :func:`conv2d_backward`).

    For callers that need no weight gradient; also timed on its own by
    ``experiments/bench_ops.py``.  dy (N, C_out, OH, OW) -> dx (N, C, H, W).
    """
    return _backward(dy, cache, need_dx=True, need_dw=False, need_db=False)[0]


def conv2d_backward_filter(dy, cache):
    """Only the parameter gradients ``(dw, db)`` with ``dw = dY @ col.T`` and
    ``db = sum_{n,oy,ox} dy`` (see :func:`conv2d_backward`); db is None without bias.

    For a first layer, whose input needs no gradient.  dy (N, C_out, OH, OW).
    """
    return _backward(dy, cache, need_dx=False, need_dw=True, need_db=cache.has_bias)[1:]


# ----------------------------------------------------------------------------
# `tinynorm gradcheck`
# ----------------------------------------------------------------------------

def gradcheck_cases():
    """Small float64 cases: kernels 1/3/5 and 2x3, strides 1/2/(2,1), pads 0/1/2,
    and a 3x3 / stride-1 conv with 16 channels (Winograd)."""
    rng = np.random.default_rng(0)
    configs = [
        # (N, C, H, W), C_out, (kh, kw), stride, pad, bias
        ((2, 3, 5, 6), 4, (3, 3), 1, 1, True),
        ((1, 2, 7, 5), 3, (3, 3), 2, 0, True),
        ((2, 2, 6, 7), 3, (5, 5), 1, 2, False),
        ((2, 3, 4, 5), 2, (1, 1), 1, 0, True),
        ((1, 2, 7, 6), 3, (2, 3), (2, 1), (1, 2), True),
        ((2, 16, 5, 4), 16, (3, 3), 1, 1, True),        # the Winograd path
    ]
    cases = []
    for shape, c_out, (kh, kw), stride, pad, bias in configs:
        x = rng.standard_normal(shape)
        w = rng.standard_normal((c_out, shape[1], kh, kw)) / np.sqrt(shape[1] * kh * kw)
        b = rng.standard_normal(c_out) if bias else None
        label = f"conv2d {kh}x{kw} s{stride} p{pad}"
        cases.append((label, conv2d_forward, conv2d_backward, (x, w, b, stride, pad),
                      ("x", "w", "b", "stride", "pad")))
    return cases

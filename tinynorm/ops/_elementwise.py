"""Element-wise sums of two arrays on all numba threads (the residual sum of a
ResNet block and its gradient), where NumPy's ``+`` runs on one thread.

Both arrays must have the same shape and memory layout (C-contiguous, or
channels-last; :mod:`tinynorm.ops.layout`); the result has that layout.
Anything else -- CuPy arrays, mixed layouts or dtypes, the ``use_numba``
setting off -- takes NumPy's (or CuPy's) operators, with the same values.
"""
from __future__ import annotations

from numba import njit, prange

from . import _kernels as kernels
from . import layout

__all__ = ["add", "add_into", "add_relu"]


@njit(parallel=True, cache=True)
def _add_kernel(a, b, out):
    for i in prange(a.size):
        out[i] = a[i] + b[i]


@njit(parallel=True, cache=True)
def _add_relu_kernel(a, b, out):
    for i in prange(a.size):
        v = a[i] + b[i]
        out[i] = 0 if v <= 0 else v    # NaN <= 0 is False: NaN passes, as in relu_forward


def _same_dense(a, b):
    if not kernels.numba_ok(a, b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if layout.is_channels_last(a):
        return layout.is_channels_last(b)
    return a.flags.c_contiguous and b.flags.c_contiguous


def add(a, b):
    """a + b, as a new array."""
    if not _same_dense(a, b):
        return a + b
    out = layout.empty_like_layout(a, a.shape)
    kernels.launch(_add_kernel, a.size, 3 * a.size, layout.flat(a), layout.flat(b),
                   layout.flat(out))
    return out


def add_into(a, b):
    """a += b, in place; returns a."""
    if not _same_dense(a, b):
        a += b
        return a
    fa = layout.flat(a)
    kernels.launch(_add_kernel, a.size, 3 * a.size, fa, layout.flat(b), fa)
    return a


def add_relu(a, b):
    """max(a + b, 0), as a new array, in one pass (a residual block's sum and
    its ReLU): the same values as ``relu_forward(add(a, b))[0]``."""
    if not _same_dense(a, b):
        from .activations import relu_inplace
        return relu_inplace(a + b)
    out = layout.empty_like_layout(a, a.shape)
    kernels.launch(_add_relu_kernel, a.size, 3 * a.size, layout.flat(a), layout.flat(b),
                   layout.flat(out))
    return out

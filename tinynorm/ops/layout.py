"""Memory layout of image tensors: NCHW or channels-last.

Every image tensor in tinynorm has the logical shape (N, C, H, W) -- the op
contract's shapes and formulas do not change.  Its *memory* may be plain
NCHW (C-contiguous) or channels-last: the elements of one pixel's channels
adjacent, i.e. an (N, H, W, C) C-contiguous buffer seen through
``transpose(0, 3, 1, 2)`` -- PyTorch's ``torch.channels_last``.  NumPy's
element-wise operations (``np.maximum``, ``+``, ``*`` with a per-channel
(1, C, 1, 1) array) keep their inputs' memory layout, so a channels-last
tensor stays channels-last through ReLU, residual sums and per-channel
affine maps; the ops that care (convolution, batch norm, pooling) read the
layout from the array's strides and write their outputs in the same layout.

A model turns channels-last at its first convolution when the
``channels_last`` setting asks -- by default ("auto") where that convolution
runs on oneDNN, whose fast kernels want it (:func:`tinynorm.ops.conv2d_forward`
then answers in it; the input gradient comes back in the caller's layout), and
the classifier's global pooling reads either layout.  The values are the same
in both layouts; only the order of the float additions inside the kernels
differs.
"""
from __future__ import annotations

import numpy as np

__all__ = ["is_channels_last", "channels_last_strides", "to_channels_last", "to_nchw",
           "empty_like_layout", "dense", "like", "flat"]


def is_channels_last(a):
    """True when ``a`` is 4-D with channels-last memory and not also plain
    NCHW (an array with C == 1 or H == W == 1 is both; it counts as NCHW)."""
    if getattr(a, "ndim", 0) != 4 or a.flags.c_contiguous:
        return False
    return a.transpose(0, 2, 3, 1).flags.c_contiguous


def channels_last_strides(shape):
    """Element strides of a channels-last array of logical shape (N, C, H, W)."""
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def to_channels_last(a):
    """``a`` (N, C, H, W) in channels-last memory (the same values; no copy if
    it already is)."""
    if is_channels_last(a):
        return a
    xp = np if isinstance(a, np.ndarray) else _module_of(a)
    return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def to_nchw(a):
    """``a`` in plain NCHW memory (C-contiguous; no copy if it already is)."""
    xp = np if isinstance(a, np.ndarray) else _module_of(a)
    return xp.ascontiguousarray(a)


def empty_like_layout(x, shape, dtype=None):
    """An uninitialised array of logical ``shape`` in ``x``'s layout
    (channels-last when x is, else C-contiguous)."""
    xp = np if isinstance(x, np.ndarray) else _module_of(x)
    dtype = x.dtype if dtype is None else dtype
    if is_channels_last(x):
        n, c, h, w = shape
        return xp.empty((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
    return xp.empty(shape, dtype=dtype)


def dense(a):
    """``a`` itself when it is channels-last or C-contiguous, else a
    C-contiguous copy: memory a flat kernel can walk, layout kept."""
    if is_channels_last(a):
        return a
    xp = np if isinstance(a, np.ndarray) else _module_of(a)
    return xp.ascontiguousarray(a)


def like(a, ref):
    """``a`` in ``ref``'s layout (channels-last or C-contiguous; a copy only
    where they differ), e.g. a gradient before a flat kernel pairs it with the
    forward's output."""
    if is_channels_last(ref):
        return to_channels_last(a)
    return to_nchw(a)


def flat(a):
    """A 1-D view of the memory of a channels-last or C-contiguous array, in
    memory order (NHWC order for channels-last)."""
    if is_channels_last(a):
        return a.transpose(0, 2, 3, 1).reshape(-1)
    if not a.flags.c_contiguous:
        raise ValueError("layout.flat: the array is neither C-contiguous nor channels-last")
    return a.reshape(-1)


def _module_of(a):
    from .. import backend
    return backend.get_array_module(a)

"""ReLU: y = max(x, 0).

NumPy float32/float64 arrays run a numba kernel (one pass, launched through
``_kernels.launch``); other arrays (CuPy), and every array with the
``use_numba`` setting off (:mod:`tinynorm.settings`), use ``xp.maximum`` and
``xp.where``, which compute the same values (so the backward needs no record
of which the forward ran).  NaN inputs propagate to the output, as with
``numpy.maximum``, so a diverging network still shows NaN downstream.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import backend
from . import _kernels as kernels
from . import layout

__all__ = ["relu_forward", "relu_inplace", "relu_backward", "relu_backward_inplace",
           "gradcheck_cases"]


@njit(parallel=True, cache=True)
def _relu_kernel(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = 0 if v <= 0 else v   # NaN <= 0 is False: NaN passes through


@njit(parallel=True, cache=True)
def _relu_backward_kernel(dy, y, dx):
    for i in prange(dy.size):
        dx[i] = dy[i] if y[i] > 0 else 0


def relu_forward(x):
    """y = max(x, 0), elementwise.

    x : any shape, floating point.  Returns y (same shape; channels-last when x
    is, else C-contiguous; see :mod:`tinynorm.ops.layout`) and
    the cache ``y`` (its positive entries are where x > 0).
    """
    if not backend.is_array(x):
        raise ValueError(f"relu: x must be a NumPy or CuPy array; got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise ValueError(f"relu: x must be a floating-point array; got dtype {x.dtype}")
    if kernels.numba_ok(x):
        x = layout.dense(x)
        y = layout.empty_like_layout(x, x.shape)
        kernels.launch(_relu_kernel, x.size, x.size, layout.flat(x), layout.flat(y))
        return y, y
    y = layout.dense(backend.get_array_module(x).maximum(x, 0))
    return y, y


def relu_inplace(y):
    """``y = max(y, 0)`` in y's own memory; returns y (the same values as
    ``relu_forward(y)[0]``, NaN passing through).

    For a layer's fresh output that nothing else holds (a convolution's or
    batch norm's ``y`` before its ReLU: :class:`tinynorm.nn.Sequential` runs
    the pair so): one read-write pass instead of a read pass and a write pass
    to a new array.  The ReLU's cache is then y itself, as ``relu_forward``'s
    is.
    """
    if kernels.numba_ok(y) and (y.flags.c_contiguous or layout.is_channels_last(y)):
        fy = layout.flat(y)
        kernels.launch(_relu_kernel, y.size, y.size, fy, fy)
        return y
    xp = backend.get_array_module(y)
    # maximum(NaN, 0) is NaN, as the kernel's
    return xp.maximum(y, y.dtype.type(0), out=y)


def relu_backward(dy, cache):
    """dx = dy * [x > 0]  (= dy * [y > 0]); the kink at 0 gets gradient 0.

    dy : same shape as x.  Returns ``(dx,)``.
    """
    y = cache
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"relu_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{tuple(y.shape)} (the forward output's shape)")
    if kernels.numba_ok(dy, y) and dy.dtype == y.dtype:
        dy = layout.like(dy, y)             # the kernel pairs dy and y element by element
        dx = layout.empty_like_layout(y, y.shape)
        kernels.launch(_relu_backward_kernel, dy.size, dy.size, layout.flat(dy), layout.flat(y),
                       layout.flat(dx))
        return (dx,)
    xp = backend.get_array_module(dy)
    return (xp.where(y > 0, dy, xp.zeros((), dtype=dy.dtype)),)


def relu_backward_inplace(dy, cache):
    """``relu_backward``'s dx written into dy's own memory (returns ``(dx,)``,
    dx being dy unless dy had to change layout to pair with y): the same
    values, for an incoming gradient that nothing else holds (the fresh dx
    of the layer after the ReLU: :class:`tinynorm.nn.Sequential` runs it so)."""
    y = cache
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(f"relu_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{tuple(y.shape)} (the forward output's shape)")
    if kernels.numba_ok(dy, y) and dy.dtype == y.dtype:
        dy = layout.like(dy, y)             # a copy only where the layouts differ
        fdy = layout.flat(dy)
        kernels.launch(_relu_backward_kernel, dy.size, dy.size, fdy, layout.flat(y), fdy)
        return (dy,)
    xp = backend.get_array_module(dy)
    # where y > 0 is false (y <= 0 or NaN) the gradient is 0, as relu_backward's
    xp.copyto(dy, xp.zeros((), dtype=dy.dtype), where=~(y > 0))
    return (dy,)


def gradcheck_cases():
    """float64 inputs with |x| >= 0.1, away from the kink at 0."""
    rng = np.random.default_rng(2)
    cases = []
    for shape in [(2, 3, 4, 5), (7, 6)]:
        x = rng.uniform(0.1, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        cases.append((f"relu {shape}", relu_forward, relu_backward, (x,), ("x",)))
    return cases

"""2-D max and average pooling over NCHW arrays.

    max: y[n, c, oy, ox] = max  over the window of x_pad (padding is -inf)
    avg: y[n, c, oy, ox] = mean over the window's real (non-padding) pixels

Window (oy, ox) covers padded rows oy*sh .. oy*sh + kh - 1 and columns
ox*sw .. ox*sw + kw - 1; OH = (H + 2ph - kh) // sh + 1 (floor mode).

Average pooling uses ``count_include_pad=False``: padding pixels are neither
added nor counted, so a border window averages only the pixels it really
covers (Caffe and cuDNN's "exclude padding" mode; PyTorch's default is the
other one).  Global average pooling is ``avg_pool2d`` with kernel = (H, W),
stride 1, pad 0, where the two conventions agree.

``pad`` must be smaller than ``kernel`` in each dimension, which guarantees
that every window holds at least one real pixel (so max is finite and the
average's count is >= 1).

Max pooling ties: the first maximum in window order (row by row) wins and
alone receives the gradient.  NaN inputs propagate to the output.

NumPy float32/float64 input runs numba kernels, one ``prange`` over the N*C
planes (each plane belongs to one thread, so the backward scatter has no
races; the inner loops run along output columns).  Other arrays (CuPy), and
every array with the ``use_numba`` setting off (:mod:`tinynorm.settings`), use
the array-generic version: a Python loop over the kh*kw kernel offsets of
strided-slice operations.  The cache records which ran, and the backward
follows it.  The tests hold the two equal.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from .. import backend
from . import _geometry as geo
from . import _kernels as kernels
from . import layout

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
           "avg_pool2d_backward", "gradcheck_cases"]


def _check_args(op, x, kernel, stride, pad):
    if not backend.is_array(x):
        raise ValueError(f"{op}: x must be a NumPy or CuPy array; got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{op}: x must be a floating-point array; got dtype {x.dtype}")
    if min(x.shape) == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(x.shape)}")
    kernel = geo.pair(kernel, "kernel", op, minimum=1)
    stride = kernel if stride is None else geo.pair(stride, "stride", op, minimum=1)
    pad = geo.pair(pad, "pad", op, minimum=0)
    if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise ValueError(f"{op}: pad {pad} must be smaller than kernel {kernel} in each "
                         f"dimension (else a window could hold only padding)")
    out_hw = geo.window_geometry(op, x.shape, kernel, stride, pad)
    return kernel, stride, pad, out_hw


def _fast(*arrays):
    return all(isinstance(a, np.ndarray) and a.dtype in kernels.FAST_DTYPES for a in arrays)


def _check_dy(op, dy, y_shape, dtype):
    if tuple(dy.shape) != tuple(y_shape):
        raise ValueError(f"{op}_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{tuple(y_shape)} (the forward output's shape)")
    if dy.dtype != dtype:
        raise ValueError(f"{op}_backward: dtype mismatch: dy is {dy.dtype} but the forward "
                         f"ran in {dtype}")


# ----------------------------------------------------------------------------
# numba kernels.  Flat arrays, one (n, c) plane per prange iteration.  Both
# poolings are separable: a pass along each input row over the kw columns of
# every output column (into a per-plane (H, OW) buffer), then a pass down the
# kh rows of every output row, whose inner loop runs along contiguous output
# columns.  Measured for cifar10-nv pool3 (128x128x28x28, 3x3/2 pad 1), one
# thread: 42 ms, against 100 ms for the direct kh*kw window loop.
# ----------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _span(o, k, s, p, size):
    """Real input positions [lo, hi) of window o along one axis."""
    start = o * s - p
    return max(start, 0), min(start + k, size)


@njit(cache=True, inline="always")
def _takes(v, best):
    """Whether v replaces the running max: larger, or NaN over a number (NaN
    wins and sticks)."""
    return (v > best) | ((v != v) & (best == best))


@njit(cache=True, inline="always")
def _takes_finite(v, best):
    """:func:`_takes` for inputs without NaN: a plain comparison, which runs
    the pooling forward in ~0.6x the time (the NaN test kept its loops slow)."""
    return v > best


@njit(parallel=True, cache=True)
def _max_fwd_kernel(x, n_planes, h, w, kh, kw, sh, sw, ph, pw, oh, ow, y, arg):
    """y = window max; arg = flat index (iy*w + ix) of the max inside its plane.

    Each pass starts from the first real pixel and takes a later one when
    :func:`_takes` says so, so the first maximum in row-major window order
    wins.  ``_max_fwd_finite`` is this kernel with :func:`_takes_finite`.
    """
    for pl in prange(n_planes):
        xb = pl * h * w
        yb = pl * oh * ow
        row_max = np.empty(h * ow, dtype=x.dtype)    # (H, OW): max over the window's columns
        row_arg = np.empty(h * ow, dtype=np.int32)   # its column ix
        for iy in range(h):
            r = iy * ow
            src = xb + iy * w
            for ox in range(ow):
                lo, hi = _span(ox, kw, sw, pw, w)
                best = x[uint64(src + lo)]
                best_ix = lo
                for ix in range(lo + 1, hi):
                    v = x[uint64(src + ix)]
                    take = _takes(v, best)
                    best = v if take else best
                    best_ix = ix if take else best_ix
                row_max[r + ox] = best
                row_arg[r + ox] = best_ix
        for oy in range(oh):
            lo, hi = _span(oy, kh, sh, ph, h)
            dst = uint64(yb + oy * ow)
            for ox in range(ow):
                y[dst + uint64(ox)] = row_max[lo * ow + ox]
                arg[dst + uint64(ox)] = lo * w + row_arg[lo * ow + ox]
            for iy in range(lo + 1, hi):
                r = iy * ow
                for ox in range(ow):
                    t = dst + uint64(ox)
                    v = row_max[r + ox]
                    best = y[t]
                    take = _takes(v, best)
                    y[t] = v if take else best
                    arg[t] = iy * w + row_arg[r + ox] if take else arg[t]


# the kernel with _takes_finite in place of _takes
_max_fwd_finite = njit(parallel=True, cache=True)(
    kernels.function_copy(_max_fwd_kernel, "finite", _takes=_takes_finite))


@njit(parallel=True, cache=True)
def _max_bwd_kernel(dy, arg, n_planes, hw, ohw, dx):
    for pl in prange(n_planes):
        xb = uint64(pl * hw)
        yb = uint64(pl * ohw)
        for t in range(uint64(hw)):
            dx[xb + t] = 0
        for t in range(uint64(ohw)):
            dx[xb + uint64(arg[yb + t])] += dy[yb + t]


@njit(parallel=True, cache=True)
def _avg_fwd_kernel(x, n_planes, h, w, kh, kw, sh, sw, ph, pw, oh, ow, y):
    """y = (1/count_h) sum_rows (1/count_w) sum_cols x, counts of real pixels."""
    for pl in prange(n_planes):
        xb = pl * h * w
        yb = pl * oh * ow
        row_mean = np.empty(h * ow, dtype=x.dtype)   # (H, OW): mean over the window's columns
        for iy in range(h):
            src = xb + iy * w
            for ox in range(ow):
                lo, hi = _span(ox, kw, sw, pw, w)
                acc = x[uint64(src + lo)]
                for ix in range(lo + 1, hi):
                    acc += x[uint64(src + ix)]
                row_mean[iy * ow + ox] = acc / (hi - lo)
        for oy in range(oh):
            lo, hi = _span(oy, kh, sh, ph, h)
            dst = uint64(yb + oy * ow)
            for ox in range(ow):
                y[dst + uint64(ox)] = row_mean[lo * ow + ox]
            for iy in range(lo + 1, hi):
                for ox in range(ow):
                    y[dst + uint64(ox)] += row_mean[iy * ow + ox]
            inv = 1.0 / (hi - lo)
            for ox in range(ow):
                y[dst + uint64(ox)] *= inv


@njit(parallel=True, cache=True)
def _avg_bwd_kernel(dy, n_planes, h, w, kh, kw, sh, sw, ph, pw, oh, ow, dx):
    """The transpose of _avg_fwd_kernel: spread dy/count_h down the window's
    rows (into an (H, OW) buffer), then /count_w across its columns."""
    for pl in prange(n_planes):
        xb = pl * h * w
        yb = pl * oh * ow
        row_grad = np.zeros(h * ow, dtype=dy.dtype)   # (H, OW)
        for oy in range(oh):
            lo, hi = _span(oy, kh, sh, ph, h)
            src = uint64(yb + oy * ow)
            inv = 1.0 / (hi - lo)
            for iy in range(lo, hi):
                for ox in range(ow):
                    row_grad[iy * ow + ox] += dy[src + uint64(ox)] * inv
        for t in range(h * w):
            dx[uint64(xb + t)] = 0
        for iy in range(h):
            dst = xb + iy * w
            for ox in range(ow):
                lo, hi = _span(ox, kw, sw, pw, w)
                g = row_grad[iy * ow + ox] / (hi - lo)
                for ix in range(lo, hi):
                    dx[uint64(dst + ix)] += g


# ----------------------------------------------------------------------------
# channels-last max pooling: one prange over the samples (the backward's
# scatter stays inside a sample: no races), the channel vector innermost
# ----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _max_fwd_nhwc(x, n, h, w, c, kh, kw, sh, sw, ph, pw, oh, ow, y, arg):
    """y[n, oy, ox, :] = window max (x, y, arg in (N, H, W, C) memory); arg =
    iy*w + ix of the max.  Taps in row-major order, a later one taken when
    :func:`_takes` says so: the first maximum wins, NaN sticks."""
    for b in prange(n):
        for oy in range(oh):
            y_lo, y_hi = _span(oy, kh, sh, ph, h)
            for ox in range(ow):
                x_lo, x_hi = _span(ox, kw, sw, pw, w)
                out = uint64(((b * oh + oy) * ow + ox) * c)
                first = uint64(((b * h + y_lo) * w + x_lo) * c)
                for j in range(uint64(c)):
                    y[out + j] = x[first + j]
                    arg[out + j] = y_lo * w + x_lo
                for iy in range(y_lo, y_hi):
                    for ix in range(x_lo, x_hi):
                        if iy == y_lo and ix == x_lo:
                            continue
                        src = uint64(((b * h + iy) * w + ix) * c)
                        idx = iy * w + ix
                        for j in range(uint64(c)):
                            v = x[src + j]
                            if _takes(v, y[out + j]):
                                y[out + j] = v
                                arg[out + j] = idx


@njit(parallel=True, cache=True)
def _max_bwd_nhwc(dy, arg, n, hw, c, ohw, dx):
    """dx[n, arg, :] += dy[n, p, :] over the output pixels p ((N, H, W, C) memory)."""
    for b in prange(n):
        base = uint64(b * hw * c)
        for t in range(uint64(hw * c)):
            dx[base + t] = 0
        for p in range(ohw):
            src = uint64((b * ohw + p) * c)
            for j in range(uint64(c)):
                dx[base + uint64(arg[src + j]) * uint64(c) + j] += dy[src + j]


# ----------------------------------------------------------------------------
# array-generic versions (CuPy; also tested on NumPy)
# ----------------------------------------------------------------------------

def _windows(kernel, stride, oh, ow):
    """(offset index, slice tuple) for every kernel offset (i, j) of a padded array."""
    (kh, kw), (sh, sw) = kernel, stride
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                               slice(j, j + sw * (ow - 1) + 1, sw))


def _max_forward_generic(x, kernel, stride, pad, oh, ow):
    xp = backend.get_array_module(x)
    (ph, pw) = pad
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    y = xp.full((x.shape[0], x.shape[1], oh, ow), -np.inf, dtype=x.dtype)
    arg = xp.zeros(y.shape, dtype=np.int32)      # kernel offset i*kw + j of the max
    for k, window in _windows(kernel, stride, oh, ow):
        patch = x_pad[window]
        better = (patch > y) | (xp.isnan(patch) & ~xp.isnan(y))
        y = xp.where(better, patch, y)
        arg = xp.where(better, k, arg)
    return xp.ascontiguousarray(y), arg


def _max_backward_generic(dy, arg, x_shape, kernel, stride, pad):
    xp = backend.get_array_module(dy)
    n, c, h, w = x_shape
    (ph, pw) = pad
    dx_pad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dy.dtype)
    zero = xp.zeros((), dtype=dy.dtype)
    for k, window in _windows(kernel, stride, *dy.shape[2:]):
        dx_pad[window] += xp.where(arg == k, dy, zero)
    return xp.ascontiguousarray(dx_pad[:, :, ph:ph + h, pw:pw + w])


def _avg_counts(xp, x_shape, kernel, stride, pad, oh, ow, dtype):
    """(OH, OW) number of real pixels per window (count_include_pad=False)."""
    _, _, h, w = x_shape
    (ph, pw) = pad
    ones = xp.pad(xp.ones((1, 1, h, w), dtype=dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    count = xp.zeros((1, 1, oh, ow), dtype=dtype)
    for _, window in _windows(kernel, stride, oh, ow):
        count += ones[window]
    return count


def _avg_forward_generic(x, kernel, stride, pad, oh, ow):
    xp = backend.get_array_module(x)
    (ph, pw) = pad
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    total = xp.zeros((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
    for _, window in _windows(kernel, stride, oh, ow):
        total += x_pad[window]
    return total / _avg_counts(xp, x.shape, kernel, stride, pad, oh, ow, x.dtype)


def _avg_backward_generic(dy, x_shape, kernel, stride, pad):
    xp = backend.get_array_module(dy)
    n, c, h, w = x_shape
    (ph, pw) = pad
    oh, ow = dy.shape[2:]
    share = dy / _avg_counts(xp, x_shape, kernel, stride, pad, oh, ow, dy.dtype)
    dx_pad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dy.dtype)
    for _, window in _windows(kernel, stride, oh, ow):
        dx_pad[window] += share
    return xp.ascontiguousarray(dx_pad[:, :, ph:ph + h, pw:pw + w])


# ----------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------

def _geometry_args(x_shape, kernel, stride, pad, out_hw):
    n, c, h, w = x_shape
    return (n * c, h, w, *kernel, *stride, *pad, *out_hw)


def max_pool2d_forward(x, kernel, stride=None, pad=0):
    """Max pooling.

    x : (N, C, H, W) float;  kernel, stride, pad : int or (h, w) pair
    (stride None = kernel; pad < kernel; padding counts as -inf).
    Returns y (N, C, OH, OW), C-contiguous, and a cache holding the argmax.
    """
    op = "max_pool2d"
    kernel, stride, pad, (oh, ow) = _check_args(op, x, kernel, stride, pad)
    if layout.is_channels_last(x):
        n, c, h, w = x.shape
        if kernels.numba_ok(x):
            y = np.empty((n, oh, ow, c), dtype=x.dtype)
            arg = np.empty(y.shape, dtype=np.int32 if h * w < 2**31 else np.int64)
            kernels.launch(_max_fwd_nhwc, n, x.size + y.size, layout.flat(x), n, h, w, c,
                           *kernel, *stride, *pad, oh, ow, y.reshape(-1), arg.reshape(-1))
            return y.transpose(0, 3, 1, 2), ("channels_last_numba", arg, x.shape, x.dtype,
                                              kernel, stride, pad)
        # the array code on an NCHW copy, answering in x's layout
        y, cache = max_pool2d_forward(layout.to_nchw(x), kernel, stride, pad)
        return layout.to_channels_last(y), ("channels_last", cache)
    if kernels.numba_ok(x):
        x = np.ascontiguousarray(x)
        y = np.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
        # arg: (N, C, OH, OW) flat index iy*W + ix of the max within its plane
        arg = np.empty(y.shape, dtype=np.int32 if x.shape[2] * x.shape[3] < 2**31
                       else np.int64)
        # a NaN anywhere makes the max NaN (one vectorised pass over x): only
        # then the NaN-aware comparison
        fwd = _max_fwd_kernel if np.isnan(x.max()) else _max_fwd_finite
        kernels.launch(fwd, y.shape[0] * y.shape[1], x.size + y.size, x.reshape(-1),
                   *_geometry_args(x.shape, kernel, stride, pad, (oh, ow)), y.reshape(-1),
                   arg.reshape(-1))
        return y, ("numba", arg, x.shape, x.dtype, kernel, stride, pad)
    y, arg = _max_forward_generic(x, kernel, stride, pad, oh, ow)
    return y, ("generic", arg, x.shape, x.dtype, kernel, stride, pad)


def max_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the windows whose
    (first) maximum is x[n, c, h, w]; zero elsewhere.

    dy : (N, C, OH, OW).  Returns ``(dx,)`` with dx (N, C, H, W).
    """
    if cache[0] == "channels_last":
        (dx,) = max_pool2d_backward(layout.to_nchw(dy), cache[1])
        return (layout.to_channels_last(dx),)
    path, arg, x_shape, dtype, kernel, stride, pad = cache
    if path == "channels_last_numba":
        n, c, h, w = x_shape
        oh, ow = arg.shape[1:3]
        _check_dy("max_pool2d", dy, (n, c, oh, ow), dtype)
        dy = layout.to_channels_last(np.asarray(dy, dtype=dtype))
        dx = np.empty((n, h, w, c), dtype=dtype)
        kernels.launch(_max_bwd_nhwc, n, dx.size + dy.size, layout.flat(dy), arg.reshape(-1),
                       n, h * w, c, oh * ow, dx.reshape(-1))
        return (dx.transpose(0, 3, 1, 2),)
    _check_dy("max_pool2d", dy, arg.shape, dtype)
    if path == "numba" and _fast(dy):
        dy = np.ascontiguousarray(dy)
        dx = np.empty(x_shape, dtype=dy.dtype)
        n, c, h, w = x_shape
        kernels.launch(_max_bwd_kernel, n * c, dx.size + dy.size, dy.reshape(-1), arg.reshape(-1),
                   n * c, h * w, dy.shape[2] * dy.shape[3], dx.reshape(-1))
        return (dx,)
    return (_max_backward_generic(dy, arg, x_shape, kernel, stride, pad),)


def avg_pool2d_forward(x, kernel, stride=None, pad=0):
    """Average pooling with count_include_pad=False (see the module docstring).

    x : (N, C, H, W) float;  kernel, stride, pad : int or (h, w) pair
    (stride None = kernel; pad < kernel).  Global average pooling:
    ``avg_pool2d_forward(x, x.shape[2:], 1, 0)``.
    Returns y (N, C, OH, OW), C-contiguous, and the cache.
    """
    op = "avg_pool2d"
    kernel, stride, pad, (oh, ow) = _check_args(op, x, kernel, stride, pad)
    out_shape = (x.shape[0], x.shape[1], oh, ow)
    if layout.is_channels_last(x):
        n, c, h, w = x.shape
        if (oh, ow) == (1, 1) and kernel == (h, w) and pad == (0, 0):
            # global pooling: the mean of each pixel's channel vector, over (H, W) rows
            rows = x.transpose(0, 2, 3, 1).reshape(n, h * w, c)
            y = rows.mean(axis=1).astype(x.dtype, copy=False).reshape(out_shape)
            return y, ("channels_last_global", out_shape, x.shape, x.dtype, kernel, stride, pad)
        y, cache = avg_pool2d_forward(layout.to_nchw(x), kernel, stride, pad)
        return layout.to_channels_last(y), ("channels_last", cache)
    if kernels.numba_ok(x):
        x = np.ascontiguousarray(x)
        y = np.empty(out_shape, dtype=x.dtype)
        kernels.launch(_avg_fwd_kernel, out_shape[0] * out_shape[1], x.size + y.size,
                   x.reshape(-1), *_geometry_args(x.shape, kernel, stride, pad, (oh, ow)),
                   y.reshape(-1))
        return y, ("numba", out_shape, x.shape, x.dtype, kernel, stride, pad)
    y = _avg_forward_generic(x, kernel, stride, pad, oh, ow)
    return y, ("generic", out_shape, x.shape, x.dtype, kernel, stride, pad)


def avg_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = sum over the windows covering (h, w) of
    dy[n, c, oy, ox] / count(oy, ox), count = real pixels in that window.

    dy : (N, C, OH, OW).  Returns ``(dx,)`` with dx (N, C, H, W).
    """
    if cache[0] == "channels_last":
        (dx,) = avg_pool2d_backward(layout.to_nchw(dy), cache[1])
        return (layout.to_channels_last(dx),)
    path, out_shape, x_shape, dtype, kernel, stride, pad = cache
    _check_dy("avg_pool2d", dy, out_shape, dtype)
    if path == "channels_last_global":
        n, c, h, w = x_shape
        xp = backend.get_array_module(dy)
        share = (dy.reshape(n, 1, 1, c) / (h * w)).astype(dtype, copy=False)
        dx = xp.ascontiguousarray(xp.broadcast_to(share, (n, h, w, c)))
        return (dx.transpose(0, 3, 1, 2),)
    if path == "numba" and _fast(dy):
        dy = np.ascontiguousarray(dy)
        dx = np.empty(x_shape, dtype=dy.dtype)
        kernels.launch(_avg_bwd_kernel, x_shape[0] * x_shape[1], dx.size + dy.size,
                   dy.reshape(-1), *_geometry_args(x_shape, kernel, stride, pad,
                                                   out_shape[2:]), dx.reshape(-1))
        return (dx,)
    return (_avg_backward_generic(dy, x_shape, kernel, stride, pad),)


def gradcheck_cases():
    """float64 cases over kernels 2/3/5, strides 1/2, pads 0/1/2, non-square
    maps, batch 1 and global pooling.  Max-pool inputs are a random
    permutation of well-separated values (no ties, no near-ties)."""
    rng = np.random.default_rng(3)

    def distinct(shape):
        return rng.permutation(np.arange(int(np.prod(shape)), dtype=np.float64)
                               ).reshape(shape) * 0.1

    configs = [
        # shape, kernel, stride, pad
        ((2, 2, 7, 6), 3, 2, 1),
        ((1, 3, 5, 5), 2, 1, 0),
        ((2, 1, 9, 8), 5, 2, 2),
        ((1, 2, 6, 7), (3, 2), (1, 2), (1, 0)),
    ]
    cases = []
    for shape, kernel, stride, pad in configs:
        cases.append((f"max_pool2d k{kernel} s{stride} p{pad}", max_pool2d_forward,
                      max_pool2d_backward, (distinct(shape), kernel, stride, pad),
                      ("x", "kernel", "stride", "pad")))
        cases.append((f"avg_pool2d k{kernel} s{stride} p{pad}", avg_pool2d_forward,
                      avg_pool2d_backward, (rng.standard_normal(shape), kernel, stride, pad),
                      ("x", "kernel", "stride", "pad")))
    x = rng.standard_normal((2, 3, 5, 5))
    cases.append(("avg_pool2d global 5x5", avg_pool2d_forward, avg_pool2d_backward,
                  (x, (5, 5), 1, 0), ("x", "kernel", "stride", "pad")))
    return cases

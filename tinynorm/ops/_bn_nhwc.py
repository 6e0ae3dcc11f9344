"""numba kernels of training-mode batch norm on channels-last arrays.

A channels-last (N, C, H, W) array is, in memory, G groups (the chunks of
``chunk`` samples; G = 1 without) of R = k*H*W rows of C contiguous values.
Every statistic is a sum down the rows, so the kernels walk the memory in
order, with the channel loop innermost (one vector per row at C = 16..512):

    forward   pass 1  mean[g, c] = sum_r x / R               (float64 sums)
              pass 2  var[g, c]  = sum_r (x - mean)^2 / R    (two passes, as the
                      array code: no cancellation whatever the mean)
              pass 3  y = (x - mean) * (gamma * inv_std) + beta
    backward  pass 1  sdy[g, c] = sum_r dy,  sdyx[g, c] = sum_r dy * (x - mean)
              pass 2  dx = gamma*inv_std/m * (m*dy - sdy - x_hat * sdyx*inv_std)

Each pass is parallel over blocks of rows; a pass-1 block writes its own
partial sums, added up afterwards in block order, so the result does not
depend on the thread count.  The formulas are those of
:func:`tinynorm.ops.batch_norm_backward`; the tests hold these kernels to
the array code.
"""
from __future__ import annotations

import numpy as np
from numba import float64, njit, prange, uint64

from . import _kernels as kernels

__all__ = ["forward", "backward"]

_BLOCK_ELEMENTS = 1 << 14      # about this many elements per block of rows


def _blocks(rows, c):
    return max(1, min(rows, rows * c // _BLOCK_ELEMENTS))


@njit(cache=True, inline="always")
def _block(gb, n_blocks, rows):
    """Block gb of the (group, block) pairs: its group and its rows [r0, r1)."""
    g = gb // n_blocks
    b = gb - g * n_blocks
    return g, b * rows // n_blocks, (b + 1) * rows // n_blocks


@njit(parallel=True, cache=True)
def _sum_kernel(x, n_groups, rows, c, n_blocks, s1):
    for gb in prange(n_groups * n_blocks):
        g, r0, r1 = _block(gb, n_blocks, rows)
        out = uint64(gb * c)
        for j in range(uint64(c)):
            s1[out + j] = 0.0
        for r in range(r0, r1):
            off = uint64((g * rows + r) * c)
            for j in range(uint64(c)):
                s1[out + j] += float64(x[off + j])


@njit(parallel=True, cache=True)
def _centred_squares_kernel(x, n_groups, rows, c, n_blocks, centre, s2):
    # (x - centre)^2 in x's dtype, summed in float64: the array code's rounding
    for gb in prange(n_groups * n_blocks):
        g, r0, r1 = _block(gb, n_blocks, rows)
        gc = uint64(g * c)
        out = uint64(gb * c)
        for j in range(uint64(c)):
            s2[out + j] = 0.0
        for r in range(r0, r1):
            off = uint64((g * rows + r) * c)
            for j in range(uint64(c)):
                d = x[off + j] - centre[gc + j]
                s2[out + j] += float64(d * d)


@njit(parallel=True, cache=True)
def _normalize_kernel(x, n_groups, rows, c, n_blocks, mean, scale, beta, relu, y):
    # relu: max(v, 0) -- rounding v to y's dtype and then taking the max gives
    # the same bits as rounding max(v, 0); NaN passes, as in relu_forward
    for gb in prange(n_groups * n_blocks):
        g, r0, r1 = _block(gb, n_blocks, rows)
        gc = uint64(g * c)
        for r in range(r0, r1):
            off = uint64((g * rows + r) * c)
            for j in range(uint64(c)):
                v = (x[off + j] - mean[gc + j]) * scale[gc + j] + beta[j]
                if relu and v <= 0:
                    v = 0.0
                y[off + j] = v


@njit(parallel=True, cache=True)
def _grad_sums_kernel(dy, x, n_groups, rows, c, n_blocks, mean, sdy, sdyx):
    for gb in prange(n_groups * n_blocks):
        g, r0, r1 = _block(gb, n_blocks, rows)
        gc = uint64(g * c)
        out = uint64(gb * c)
        for j in range(uint64(c)):
            sdy[out + j] = 0.0
            sdyx[out + j] = 0.0
        for r in range(r0, r1):
            off = uint64((g * rows + r) * c)
            for j in range(uint64(c)):
                d = float64(dy[off + j])
                sdy[out + j] += d
                sdyx[out + j] += d * (float64(x[off + j]) - mean[gc + j])


@njit(parallel=True, cache=True)
def _grad_input_kernel(dy, x, n_groups, rows, c, n_blocks, mean, inv_std, k_dy, k_sum,
                       k_xhat, dx):
    # dx = k_dy*dy - k_sum - k_xhat * x_hat,  x_hat = (x - mean) * inv_std
    for gb in prange(n_groups * n_blocks):
        g, r0, r1 = _block(gb, n_blocks, rows)
        gc = uint64(g * c)
        for r in range(r0, r1):
            off = uint64((g * rows + r) * c)
            for j in range(uint64(c)):
                x_hat = (float64(x[off + j]) - mean[gc + j]) * inv_std[gc + j]
                dx[off + j] = (k_dy[gc + j] * float64(dy[off + j]) - k_sum[gc + j]
                               - k_xhat[gc + j] * x_hat)


def _flat(a):
    # the (N, H, W, C) memory of a channels-last array, as 1-D
    return a.transpose(0, 2, 3, 1).reshape(-1)


def forward(x, gamma, beta, eps, layout, relu=False):
    """y (channels-last like x), mean, var, inv_std ((G, C) float64) for the
    channels-last x; ``layout`` = (G, k, C, S) as in ``batchnorm._layout``;
    ``relu``: y = max(batch norm's y, 0) instead, in the same pass."""
    g, k, c, s = layout
    rows = k * s
    nb = _blocks(rows, c)
    xf = _flat(x)
    part = np.empty(g * nb * c, dtype=np.float64)
    kernels.launch(_sum_kernel, g * nb, x.size, xf, g, rows, c, nb, part)
    mean = part.reshape(g, nb, c).sum(axis=1) / rows
    # centred with the mean rounded to x's dtype, as the array code does
    centre = mean.astype(x.dtype).reshape(-1)
    kernels.launch(_centred_squares_kernel, g * nb, x.size, xf, g, rows, c, nb, centre, part)
    var = part.reshape(g, nb, c).sum(axis=1) / rows
    inv_std = 1.0 / np.sqrt(var + eps)
    scale = inv_std if gamma is None else inv_std * gamma.astype(np.float64)[None, :]
    beta64 = np.zeros(c) if beta is None else beta.astype(np.float64)
    y = np.empty((x.shape[0], x.shape[2], x.shape[3], c), dtype=x.dtype)
    kernels.launch(_normalize_kernel, g * nb, 2 * x.size, xf, g, rows, c, nb,
                   mean.reshape(-1), scale.reshape(-1), beta64, relu, y.reshape(-1))
    return y.transpose(0, 3, 1, 2), mean, var, inv_std


def backward(dy, x, mean, inv_std, gamma, layout):
    """(dx channels-last, sum_dy (G, C), sum_dy_xhat (G, C)) for channels-last
    dy and x; the sums are float64."""
    g, k, c, s = layout
    rows = k * s
    m = rows
    nb = _blocks(rows, c)
    dyf, xf = _flat(dy), _flat(x)
    sdy = np.empty(g * nb * c, dtype=np.float64)
    sdyx = np.empty_like(sdy)
    kernels.launch(_grad_sums_kernel, g * nb, 2 * x.size, dyf, xf, g, rows, c, nb,
                   mean.reshape(-1), sdy, sdyx)
    sum_dy = sdy.reshape(g, nb, c).sum(axis=1)
    sum_dy_xhat = sdyx.reshape(g, nb, c).sum(axis=1) * inv_std
    scale = inv_std / m
    if gamma is not None:
        scale = scale * gamma.astype(np.float64)[None, :]
    k_dy = scale * m
    k_sum = scale * sum_dy
    k_xhat = scale * sum_dy_xhat
    dx = np.empty((x.shape[0], x.shape[2], x.shape[3], c), dtype=x.dtype)
    kernels.launch(_grad_input_kernel, g * nb, 3 * x.size, dyf, xf, g, rows, c, nb,
                   mean.reshape(-1), inv_std.reshape(-1), k_dy.reshape(-1), k_sum.reshape(-1),
                   k_xhat.reshape(-1), dx.reshape(-1))
    return dx.transpose(0, 3, 1, 2), sum_dy, sum_dy_xhat

"""Fused numba kernels for batch norm on CPU (NumPy float32/float64, 4-D input).

Batch norm is memory-bound: per element it does a handful of flops but must
read x and write y (forward) and read x, dy and write dx (backward).  The
kernels keep the traffic close to that:

* forward: one reduction pass per (chunk, channel) accumulating the shifted
  sums S1 = sum(x - K), S2 = sum((x - K)^2) in float64 (K = the channel's first
  value, so the E[x^2] - E[x]^2 cancellation is bounded by (mean - K)^2 / var,
  about 1 for a data-dependent K), then one pass per sample writing
  y = (x - mean) * (gamma * inv_std) + beta;
* backward: per (chunk, channel) one pass accumulating sum(dy) and
  sum(dy * (x - mean)) in float64, then one pass writing
  dx = k1 * dy + k2 * (x - mean) + k3 with per-channel constants.  x_hat is not
  cached: it is rebuilt from x, mean and inv_std (cached by the forward), which
  saves writing and re-reading a tensor the size of x.

Layout and threads.  The reductions run ``prange`` over blocks of consecutive
channels (threads take blocks).  A channel's values are N runs of S = H*W
contiguous elements; for small maps (7x7: 196-byte runs, 400 KB apart) a
block of several channels makes each run at least ~2 KB, which the hardware
prefetcher follows (measured ~20% faster on the 7x7 and 14x14 ResNet shapes).
A block is sized to stay in L2 (a 28x28 channel at batch 128 is 400 KB), so
the backward's second pass re-reads x and dy from L2, not memory.  The
forward's writing pass goes sample by sample instead: each thread writes a
contiguous half of y, so a freshly allocated y is page-faulted (zeroed by the
OS) right before it is written, while still in cache -- measured faster than
writing it channel by channel.

Only called through ``batchnorm.batch_norm_forward`` / ``batch_norm_backward``
(the selector ``uses_fused_kernel`` decides) or ``batchnorm.*_fused``;
compiled lazily per dtype and cached on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import prange
    AVAILABLE = True
except Exception:  # numba missing or broken: the plain array code runs instead
    numba = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "batch_norm_forward_fused", "batch_norm_backward_fused",
           "channel_block"]

# 'reassoc' lets LLVM vectorize the float64 reductions; no 'nnan'/'ninf', so a
# NaN in x still propagates to y and to the statistics.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# channel blocks: contiguous runs of at least this many elements ...
_MIN_RUN = 512
# ... as long as a block of x and dy fits in this many bytes (L2 is 1 MB/core here)
_BLOCK_BYTES = 512 * 1024


def channel_block(k, c, s, itemsize):
    """Channels per block for a (G, k, C, S) view (see the module docstring)."""
    cb = max(1, -(-_MIN_RUN // s))
    cb = min(cb, max(1, _BLOCK_BYTES // (2 * k * s * itemsize)), c)
    return int(cb)


if AVAILABLE:
    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _stats_kernel(x, eps, cb, mean, var, inv_std):
        # x: (G, k, C, S); cb channels per block; mean, var, inv_std: (G, C) float64
        n_groups, k, n_chan, s = x.shape
        m = k * s
        n_blocks = (n_chan + cb - 1) // cb
        for gb in prange(n_groups * n_blocks):
            g = gb // n_blocks
            c0 = (gb - g * n_blocks) * cb
            nc = min(cb, n_chan - c0)
            shift = np.empty(nc)
            s1 = np.zeros(nc)
            s2 = np.zeros(nc)
            for c in range(nc):
                shift[c] = x[g, 0, c0 + c, 0]
            for i in range(k):
                for c in range(nc):
                    sh = shift[c]
                    a = 0.0
                    b = 0.0
                    for j in range(s):
                        d = np.float64(x[g, i, c0 + c, j]) - sh
                        a += d
                        b += d * d
                    s1[c] += a
                    s2[c] += b
            for c in range(nc):
                mean_shifted = s1[c] / m
                v = s2[c] / m - mean_shifted * mean_shifted
                if v < 0.0:  # round-off when every value is (nearly) equal
                    v = 0.0
                mean[g, c0 + c] = shift[c] + mean_shifted
                var[g, c0 + c] = v
                inv_std[g, c0 + c] = 1.0 / np.sqrt(v + eps)

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _normalize_kernel(x, mean_t, scale_t, beta_t, y):
        # x, y: (G, k, C, S); mean_t, scale_t: (G, C), beta_t: (C,), all in x's
        # dtype (scale = gamma * inv_std), so the element-wise pass runs in x's
        # dtype (16 float32 lanes per AVX-512 register).  Threads take samples.
        n_groups, k, n_chan, s = x.shape
        for gi in prange(n_groups * k):
            g = gi // k
            i = gi - g * k
            for c in range(n_chan):
                mu = mean_t[g, c]
                a = scale_t[g, c]
                b = beta_t[c]
                for j in range(s):
                    y[g, i, c, j] = (x[g, i, c, j] - mu) * a + b

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
    def _backward_kernel(dy, x, gamma, mean, inv_std, cb, dx, sum_dy, sum_dy_xhat, coef):
        # dy, x, dx: (G, k, C, S); gamma: (C,) x's dtype; mean, inv_std: (G, C)
        # float64; sum_dy, sum_dy_xhat: (G, C) float64 outputs; coef: (G*C, 4)
        # x's dtype -- per-channel constants rounded to x's dtype for the
        # element-wise pass
        n_groups, k, n_chan, s = x.shape
        m = k * s
        n_blocks = (n_chan + cb - 1) // cb
        for gb in prange(n_groups * n_blocks):
            g = gb // n_blocks
            c0 = (gb - g * n_blocks) * cb
            nc = min(cb, n_chan - c0)
            mu = np.empty(nc)
            acc_dy = np.zeros(nc)
            acc_dyx = np.zeros(nc)
            for c in range(nc):
                # centre on the mean rounded to x's dtype, as the forward's y did
                coef[g * n_chan + c0 + c, 3] = mean[g, c0 + c]
                mu[c] = np.float64(coef[g * n_chan + c0 + c, 3])
            for i in range(k):
                for c in range(nc):
                    mc = mu[c]
                    a = 0.0
                    b = 0.0
                    for j in range(s):
                        dyv = np.float64(dy[g, i, c0 + c, j])
                        a += dyv
                        b += dyv * (np.float64(x[g, i, c0 + c, j]) - mc)
                    acc_dy[c] += a
                    acc_dyx[c] += b
            for c in range(nc):
                gc = g * n_chan + c0 + c
                istd = inv_std[g, c0 + c]
                sdx = acc_dyx[c] * istd  # sum(dy * x_hat)
                sum_dy[g, c0 + c] = acc_dy[c]
                sum_dy_xhat[g, c0 + c] = sdx
                # dx = gamma*istd/m * (m dy - sum_dy - x_hat * sdx)
                #    = k1 dy + k2 (x - mu) + k3
                k1 = np.float64(gamma[c0 + c]) * istd
                coef[gc, 0] = k1
                coef[gc, 1] = -k1 * istd * sdx / m
                coef[gc, 2] = -k1 * acc_dy[c] / m
            for i in range(k):
                for c in range(nc):
                    gc = g * n_chan + c0 + c
                    k1_t = coef[gc, 0]
                    k2_t = coef[gc, 1]
                    k3_t = coef[gc, 2]
                    mu_t = coef[gc, 3]
                    for j in range(s):
                        dx[g, i, c0 + c, j] = (k1_t * dy[g, i, c0 + c, j]
                                               + k2_t * (x[g, i, c0 + c, j] - mu_t) + k3_t)


def _output(out, like):
    if out is None:
        return np.empty_like(like)
    if out.shape != like.shape or out.dtype != like.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array shaped and typed like the input")
    return out


def batch_norm_forward_fused(x, gamma, beta, eps, layout, out=None):
    """Fused forward.  x: (N, C, H, W) NumPy float32/float64; layout (G, k, C, S).

    ``out`` (optional, for benchmarks): a preallocated array for y.
    Returns y (like x) and mean, var, inv_std as (G, C) float64.
    """
    n_groups, k, c, s = layout
    x = np.ascontiguousarray(x)
    xg = x.reshape(layout)                               # (G, k, C, S) view
    mean = np.empty((n_groups, c))
    var = np.empty((n_groups, c))
    inv_std = np.empty((n_groups, c))
    _stats_kernel(xg, float(eps), channel_block(k, c, s, x.itemsize), mean, var, inv_std)
    scale = inv_std if gamma is None else inv_std * gamma.astype(np.float64)[None, :]
    beta_t = np.zeros(c, x.dtype) if beta is None else np.ascontiguousarray(beta, x.dtype)
    y = _output(out, x)
    _normalize_kernel(xg, mean.astype(x.dtype), scale.astype(x.dtype), beta_t,
                      y.reshape(layout))
    return y, mean, var, inv_std


def batch_norm_backward_fused(dy, cache, layout, out=None):
    """Fused backward.  Returns dx (like x), dgamma (C,), dbeta (C,) in x's dtype.

    ``out`` (optional, for benchmarks): a preallocated array for dx.
    """
    n_groups, k, c, s = layout
    x = np.ascontiguousarray(cache.x)
    dy = np.ascontiguousarray(dy)
    dx = _output(out, x)
    gamma = (np.ones(c, x.dtype) if cache.gamma is None
             else np.ascontiguousarray(cache.gamma, x.dtype))
    sum_dy = np.empty((n_groups, c))
    sum_dy_xhat = np.empty((n_groups, c))
    coef = np.empty((n_groups * c, 4), x.dtype)
    _backward_kernel(dy.reshape(layout), x.reshape(layout), gamma, cache.mean, cache.inv_std,
                     channel_block(k, c, s, x.itemsize), dx.reshape(layout), sum_dy,
                     sum_dy_xhat, coef)
    return dx, sum_dy_xhat.sum(axis=0).astype(x.dtype), sum_dy.sum(axis=0).astype(x.dtype)

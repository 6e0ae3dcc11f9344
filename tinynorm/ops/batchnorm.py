"""Batch normalization and its batch-statistic relatives.

* ``batch_norm``            Ioffe & Szegedy (2015), with an optional per-chunk
                            ("ghost") statistic: the paper's ResNet-50 ran on 4
                            GPUs, each normalizing its own 64-sample chunk.
* ``batch_norm_inference``  the eval-mode affine map with fixed (running)
                            statistics.
* ``mean_only_batch_norm``  Salimans & Kingma (2016), the companion of weight
                            norm: subtract the batch mean, add beta.  It has no
                            gamma on purpose (the WN layer's g is the scale).
* ``batch_renorm``          Ioffe (2017): the batch statistic corrected towards
                            the running one by clipped factors r and d, which
                            are treated as constants (no gradient flows
                            through them).

Shapes.  ``x`` is (N, C, H, W) -- statistics per channel over (N, H, W) -- or
(N, D) -- statistics per feature over N.  ``gamma``/``beta`` are (C,) (or (D,)).
With ``chunk=k`` the batch is cut into G = N / k consecutive chunks of k
samples and each chunk is normalized with its own statistics; gamma and beta
are shared.  Internally every input is viewed as (G, k, C, S) with S = H*W
(S = 1 for 2-D input); statistics have shape (G, C) and each is taken over
m = k * S values.

Speed.  On CPU, for NumPy float32/float64 4-D arrays of at least
``bn_fused_min_size`` elements (a setting of :mod:`tinynorm.settings`),
``batch_norm_forward`` and ``batch_norm_backward`` run fused numba kernels
(``_bn_numba``; two passes over the data each, float64 accumulators, parallel
over channels; the backward follows the forward's choice).  Every other case
-- CuPy arrays, 2-D input (where NumPy's reductions over axis 0 are already
contiguous), small arrays, numba missing or the ``use_numba`` setting off
(``settings.using(use_numba=False)``, or ``TINYNORM_NO_NUMBA=1``) -- runs the
plain array code.  Both are public for
tests and benchmarks: ``batch_norm_forward_reference`` /
``batch_norm_backward_reference`` and ``batch_norm_forward_fused`` /
``batch_norm_backward_fused``.  :func:`uses_fused_kernel` is the one selector.
"""
from __future__ import annotations

import numpy as np

from ..settings import current as current_settings, numba_enabled
from ..backend import get_array_module
from ._checks import check_eps
from . import _kernels as kernels
from .layout import is_channels_last, to_channels_last

__all__ = [
    "BatchNormCache",
    "batch_norm_forward", "batch_norm_relu_forward", "batch_norm_backward",
    "batch_norm_forward_reference", "batch_norm_backward_reference",
    "batch_norm_forward_fused", "batch_norm_backward_fused",
    "uses_fused_kernel", "fused_kernel_available", "uses_channels_last_kernel",
    "batch_norm_forward_channels_last", "batch_norm_backward_channels_last",
    "batch_norm_inference_forward", "batch_norm_inference_backward",
    "mean_only_batch_norm_forward", "mean_only_batch_norm_backward",
    "batch_renorm_forward", "batch_renorm_backward",
]

# The default bn_fused_min_size, 1 << 16: below it the plain NumPy code is as
# fast as the kernels and a parallel launch costs more -- ~15 us on an idle
# machine, but milliseconds when another process holds the other core and the
# worker thread waits for a time slice (measured on the 2-core development
# machine).


# -- shared helpers --------------------------------------------------------------

class BatchNormCache:
    """What the backward of a batch-statistic op needs, plus the statistics.

    Attributes (G = number of chunks, 1 without ``chunk``):

    x        the forward input, (N, C, H, W) or (N, D) -- a reference, not a copy
    mean     (G, C) float64 batch (chunk) mean
    var      (G, C) float64 *biased* batch (chunk) variance, sum((x-mean)^2)/m
    inv_std  (G, C) float64, 1 / sqrt(var + eps)
    gamma    (C,) or None (None means gamma = 1 and no dgamma is returned)
    has_beta False when beta was None (no dbeta is returned)
    chunk    the chunk size or None
    count    m, the number of values behind each statistic (k * H * W)
    fused    True when the forward ran the (NCHW) numba kernels, "channels_last"
             when it ran the channels-last ones, False for the array code
    extra    op-specific values (batch renorm's r and d)

    ``batch_mean`` / ``batch_var`` give (C,) statistics for running-average
    updates: the mean over chunks of the per-chunk mean / biased variance.
    Without chunks these are the plain batch mean and biased variance.
    """

    __slots__ = ("x", "mean", "var", "inv_std", "gamma", "has_beta", "chunk", "count",
                 "fused", "extra")

    def __init__(self, x, mean, var, inv_std, gamma, has_beta, chunk, count, fused=False,
                 extra=None):
        self.x, self.mean, self.var, self.inv_std = x, mean, var, inv_std
        self.gamma, self.has_beta, self.chunk, self.count = gamma, has_beta, chunk, count
        self.fused, self.extra = fused, extra

    @property
    def batch_mean(self):
        return self.mean.mean(axis=0)

    @property
    def batch_var(self):
        return self.var.mean(axis=0)


def _layout(x, name, chunk=None, training=False):
    """Validate ``x`` and ``chunk``; return (G, k, C, S).

    Raises ValueError for a non-float array, ndim other than 2 or 4, an empty
    batch, a chunk that is not a positive divisor of N, and -- with
    ``training`` (batch statistics) -- a statistic over a single value, where
    x - mean is 0 whatever x (the output would be beta and every gradient 0).
    """
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
        raise ValueError(f"{name}: x must be a floating-point array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim not in (2, 4):
        raise ValueError(f"{name}: x must be 2-D (N, D) or 4-D (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if x.size == 0:
        raise ValueError(f"{name}: x is empty (shape {tuple(x.shape)}): no values to "
                         f"take statistics over")
    s = int(np.prod(x.shape[2:])) if x.ndim == 4 else 1
    if chunk is None:
        layout = 1, n, c, s
    else:
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"{name}: chunk must be a positive integer or None, got {chunk!r}")
        if n % chunk:
            raise ValueError(f"{name}: batch size N={n} is not divisible by chunk={chunk}")
        layout = n // chunk, int(chunk), c, s
    if training and layout[1] * layout[3] == 1:
        # PyTorch raises the same way ("Expected more than 1 value per channel when training")
        raise ValueError(f"{name}: expected more than 1 value per channel when training, got "
                         f"input shape {tuple(x.shape)}"
                         + (f" with chunk={chunk}" if chunk is not None else ""))
    return layout


def _check_channel_param(p, pname, c, name):
    if p is None:
        return
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name}: {pname} has shape {tuple(p.shape)} but x has {c} "
                         f"channels (expected ({c},))")


def _grouped(a, layout):
    """(N, C, H, W) or (N, D) -> (G, k, C, S); a view for C-contiguous input,
    and for channels-last input too (a strided view of its (G, k, S, C) memory)."""
    if is_channels_last(a):
        g, k, c, s = layout
        return a.transpose(0, 2, 3, 1).reshape(g, k, s, c).transpose(0, 1, 3, 2)
    return a.reshape(layout)


def _ungrouped(yg, like):
    """The (G, k, C, S) result back to ``like``'s shape and memory layout
    (channels-last stays channels-last; otherwise C-contiguous)."""
    xp = get_array_module(yg)
    if is_channels_last(like):
        n, c, h, w = like.shape
        nhwc = yg.transpose(0, 1, 3, 2).reshape(n, h, w, c)
        return xp.ascontiguousarray(nhwc).transpose(0, 3, 1, 2)
    return xp.ascontiguousarray(yg.reshape(like.shape))


def _bcast(stat, dtype):
    # (G, C) statistic -> (G, 1, C, 1), broadcastable against the grouped view
    return stat[:, None, :, None].astype(dtype, copy=False)


def _chan(p, dtype):
    # (C,) parameter -> (1, 1, C, 1)
    return p[None, None, :, None].astype(dtype, copy=False)


def _stats(xg, eps):
    """Two-pass mean and biased variance over axes (1, 3) accumulated in float64.

    Returns mean, var, inv_std as (G, C) float64.
    """
    xp = get_array_module(xg)
    mean = xg.mean(axis=(1, 3), dtype=xp.float64)
    # centre with the mean rounded to x's dtype: the same centre the normalization
    # uses, so var and x_hat agree; the float64 accumulator keeps the sum exact-ish
    xc = xg - _bcast(mean, xg.dtype)
    var = (xc * xc).mean(axis=(1, 3), dtype=xp.float64)
    inv_std = 1.0 / xp.sqrt(var + eps)
    return mean, var, inv_std


# -- batch norm ------------------------------------------------------------------

def fused_kernel_available(x) -> bool:
    """True when the numba kernels can run on ``x``: a NumPy (host) array,
    float32 or float64, 4-D, and numba importable."""
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        return False
    if is_channels_last(x):
        return False        # the kernels walk NCHW planes; channels-last runs the array code
    from . import _bn_numba
    return _bn_numba.AVAILABLE


def uses_fused_kernel(x) -> bool:
    """The one selector: True when ``batch_norm_forward`` on ``x`` runs the numba
    kernels -- :func:`fused_kernel_available`, and in :mod:`tinynorm.settings`
    ``use_numba`` on, ``force_generic`` off and at least ``bn_fused_min_size`` elements."""
    settings = current_settings()
    return (numba_enabled(settings) and getattr(x, "size", 0) >= settings.bn_fused_min_size
            and fused_kernel_available(x))


def batch_norm_forward(x, gamma, beta, eps, chunk=None):
    """Batch normalization, training mode (batch statistics).

    y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta, per channel, where
    mean_B and the biased var_B are taken over (N, H, W) -- or over each chunk's
    (k, H, W) when ``chunk=k``.

    Parameters
    ----------
    x : (N, C, H, W) or (N, D) float array
    gamma, beta : (C,) arrays, or None for 1 / 0 (no gradient returned)
    eps : float > 0 added to the variance (ValueError otherwise)
    chunk : None or a divisor k of N ("ghost" batch norm: G = N / k chunks).
        Each statistic needs more than one value: k = 1 on 2-D input or on a
        1x1 map is a ValueError.  A chunk whose values are all equal has
        var = 0: x_hat = 0, y = beta, inv_std = 1/sqrt(eps), and dx = 0.

    Returns
    -------
    y : same shape and dtype as x
    cache : :class:`BatchNormCache` (``cache.batch_mean`` / ``cache.batch_var``
        give the (C,) statistics for running averages)
    """
    if uses_fused_kernel(x):
        return batch_norm_forward_fused(x, gamma, beta, eps, chunk)
    if uses_channels_last_kernel(x):
        return batch_norm_forward_channels_last(x, gamma, beta, eps, chunk)
    return batch_norm_forward_reference(x, gamma, beta, eps, chunk)


def batch_norm_backward(dy, cache):
    """Gradients of batch norm (training mode); same path choice as the forward.

    With x_hat = (x - mean) * inv_std and m values per statistic (per channel,
    per chunk):

        dbeta  = sum dy
        dgamma = sum dy * x_hat
        dx     = gamma * inv_std / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

    where the sums in dx run over the chunk's (k, H, W) and those of dgamma /
    dbeta over everything but the channel axis.

    Parameters
    ----------
    dy : array shaped like x
    cache : from :func:`batch_norm_forward`

    Returns
    -------
    dx : like x;  dgamma, dbeta : (C,) or None when the forward got None
    """
    if cache.fused == "channels_last" and kernels.fast_ok(dy) and dy.dtype == cache.x.dtype:
        return batch_norm_backward_channels_last(dy, cache)
    if cache.fused is True and fused_kernel_available(dy) and dy.dtype == cache.x.dtype:
        return batch_norm_backward_fused(dy, cache)
    return batch_norm_backward_reference(dy, cache)


def batch_norm_forward_fused(x, gamma, beta, eps, chunk=None):
    """The numba-kernel batch norm (same contract as :func:`batch_norm_forward`),
    whatever the size of ``x``; ValueError when :func:`fused_kernel_available`
    is false."""
    layout = _layout(x, "batch_norm", chunk, training=True)
    check_eps("batch_norm", eps)
    _check_channel_param(gamma, "gamma", layout[2], "batch_norm")
    _check_channel_param(beta, "beta", layout[2], "batch_norm")
    if not fused_kernel_available(x):
        raise ValueError("batch_norm_forward_fused needs a 4-D NumPy float32/float64 array "
                         "and numba")
    from . import _bn_numba
    y, mean, var, inv_std = _bn_numba.batch_norm_forward_fused(x, gamma, beta, eps, layout)
    cache = BatchNormCache(x, mean, var, inv_std, gamma, beta is not None, chunk,
                           layout[1] * layout[3], fused=True)
    return y, cache


def batch_norm_backward_fused(dy, cache):
    """The numba-kernel backward (formula as in :func:`batch_norm_backward`)."""
    from . import _bn_numba
    layout = _layout(cache.x, "batch_norm", cache.chunk)
    dx, dgamma, dbeta = _bn_numba.batch_norm_backward_fused(
        np.asarray(dy, dtype=cache.x.dtype), cache, layout)
    return (dx, dgamma if cache.gamma is not None else None,
            dbeta if cache.has_beta else None)


def uses_channels_last_kernel(x) -> bool:
    """True when ``batch_norm_forward`` on ``x`` runs the channels-last numba
    kernels (:mod:`._bn_nhwc`): a channels-last NumPy float32/float64 array
    and the numba kernels allowed (``bn_fused_min_size`` as for the NCHW ones)."""
    settings = current_settings()
    return (numba_enabled(settings) and getattr(x, "size", 0) >= settings.bn_fused_min_size
            and kernels.fast_ok(x) and is_channels_last(x))


def batch_norm_relu_forward(x, gamma, beta, eps, chunk=None):
    """``max(y, 0)`` for ``y, cache = batch_norm_forward(...)``, in one call: the
    forward of a batch norm followed by a ReLU.  Returns ``(z, cache)``; the
    backward is the pair's (``relu_backward(dz, z)``, then
    ``batch_norm_backward``).  The channels-last kernels apply the ReLU in
    their normalizing pass; elsewhere it runs in place on the fresh y.  The
    same values as the two ops."""
    if not uses_fused_kernel(x) and uses_channels_last_kernel(x):
        return batch_norm_forward_channels_last(x, gamma, beta, eps, chunk, relu=True)
    from .activations import relu_inplace
    y, cache = batch_norm_forward(x, gamma, beta, eps, chunk)
    return relu_inplace(y), cache


def batch_norm_forward_channels_last(x, gamma, beta, eps, chunk=None, relu=False):
    """Batch norm (contract of :func:`batch_norm_forward`) by the channels-last
    kernels; x must be a channels-last NumPy float array (y is channels-last);
    ``relu``: max(y, 0) instead (see :func:`batch_norm_relu_forward`)."""
    layout = _layout(x, "batch_norm", chunk, training=True)
    check_eps("batch_norm", eps)
    _check_channel_param(gamma, "gamma", layout[2], "batch_norm")
    _check_channel_param(beta, "beta", layout[2], "batch_norm")
    if not (kernels.fast_ok(x) and is_channels_last(x)):
        raise ValueError("batch_norm_forward_channels_last needs a channels-last NumPy "
                         "float32/float64 array")
    from . import _bn_nhwc
    y, mean, var, inv_std = _bn_nhwc.forward(x, gamma, beta, eps, layout, relu)
    cache = BatchNormCache(x, mean, var, inv_std, gamma, beta is not None, chunk,
                           layout[1] * layout[3], fused="channels_last")
    return y, cache


def batch_norm_backward_channels_last(dy, cache):
    """The channels-last kernels' backward (formula as in :func:`batch_norm_backward`);
    dx is channels-last."""
    from . import _bn_nhwc
    x = cache.x
    layout = _layout(x, "batch_norm", cache.chunk)
    dy = to_channels_last(np.asarray(dy, dtype=x.dtype))
    dx, sum_dy, sum_dy_xhat = _bn_nhwc.backward(dy, x, cache.mean, cache.inv_std, cache.gamma,
                                                layout)
    dgamma = sum_dy_xhat.sum(axis=0).astype(x.dtype) if cache.gamma is not None else None
    dbeta = sum_dy.sum(axis=0).astype(x.dtype) if cache.has_beta else None
    return dx, dgamma, dbeta


def batch_norm_forward_reference(x, gamma, beta, eps, chunk=None):
    """The plain array-code batch norm; same contract as :func:`batch_norm_forward`."""
    layout = _layout(x, "batch_norm", chunk, training=True)
    check_eps("batch_norm", eps)
    _check_channel_param(gamma, "gamma", layout[2], "batch_norm")
    _check_channel_param(beta, "beta", layout[2], "batch_norm")
    xg = _grouped(x, layout)                        # (G, k, C, S)
    mean, var, inv_std = _stats(xg, eps)            # (G, C) each
    y = (xg - _bcast(mean, x.dtype)) * _bcast(inv_std, x.dtype)   # x_hat
    if gamma is not None:
        y *= _chan(gamma, x.dtype)
    if beta is not None:
        y += _chan(beta, x.dtype)
    cache = BatchNormCache(x, mean, var, inv_std, gamma, beta is not None, chunk,
                           layout[1] * layout[3])
    return _ungrouped(y, x), cache


def batch_norm_backward_reference(dy, cache):
    """The plain array-code backward; formula as in :func:`batch_norm_backward`.

    x_hat is rebuilt from the cached x, mean and inv_std (an element-wise
    product; the statistics themselves are not recomputed).
    """
    xp = get_array_module(dy)
    x = cache.x
    layout = _layout(x, "batch_norm", cache.chunk)
    m = cache.count
    dyg = _grouped(dy, layout).astype(x.dtype, copy=False)        # (G, k, C, S)
    x_hat = (_grouped(x, layout) - _bcast(cache.mean, x.dtype)) * _bcast(cache.inv_std, x.dtype)
    sum_dy = dyg.sum(axis=(1, 3), dtype=xp.float64)                # (G, C)
    sum_dy_xhat = (dyg * x_hat).sum(axis=(1, 3), dtype=xp.float64)  # (G, C)
    scale = cache.inv_std / m                                       # (G, C)
    if cache.gamma is not None:
        scale = scale * cache.gamma.astype(xp.float64)[None, :]
    dx = _bcast(scale, x.dtype) * (m * dyg - _bcast(sum_dy, x.dtype)
                                   - x_hat * _bcast(sum_dy_xhat, x.dtype))
    dgamma = sum_dy_xhat.sum(axis=0).astype(x.dtype) if cache.gamma is not None else None
    dbeta = sum_dy.sum(axis=0).astype(x.dtype) if cache.has_beta else None
    return _ungrouped(dx, x), dgamma, dbeta


# -- batch norm with fixed statistics (eval mode) --------------------------------

def batch_norm_inference_forward(x, gamma, beta, mean, var, eps):
    """Eval-mode batch norm: y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Parameters
    ----------
    x : (N, C, H, W) or (N, D)
    gamma, beta : (C,) or None
    mean, var : (C,) fixed statistics (a BN layer's running_mean / running_var);
        constants, no gradient is returned for them

    Returns y (like x) and a cache.
    """
    xp = get_array_module(x)
    layout = _layout(x, "batch_norm_inference")
    check_eps("batch_norm_inference", eps)
    c = layout[2]
    for p, pname in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var")):
        _check_channel_param(p, pname, c, "batch_norm_inference")
    inv_std = 1.0 / xp.sqrt(var.astype(xp.float64) + eps)            # (C,)
    xg = _grouped(x, layout)
    x_hat = (xg - _chan(mean, x.dtype)) * _chan(inv_std, x.dtype)
    y = x_hat * _chan(gamma, x.dtype) if gamma is not None else x_hat.copy()
    if beta is not None:
        y += _chan(beta, x.dtype)
    return _ungrouped(y, x), (x_hat, inv_std, gamma, beta is not None, layout)


def batch_norm_inference_backward(dy, cache):
    """Gradients of eval-mode batch norm (the statistics are constants).

        dx     = dy * gamma / sqrt(var + eps)
        dgamma = sum dy * x_hat,   dbeta = sum dy   (over all axes but the channel)

    Returns (dx, dgamma, dbeta); dgamma / dbeta are None when the forward got None.
    """
    xp = get_array_module(dy)
    x_hat, inv_std, gamma, has_beta, layout = cache
    dyg = _grouped(dy, layout)
    scale = inv_std if gamma is None else inv_std * gamma.astype(xp.float64)
    dx = _ungrouped(dyg * _chan(scale, x_hat.dtype), dy)
    dgamma = (dyg * x_hat).sum(axis=(0, 1, 3), dtype=xp.float64).astype(x_hat.dtype) \
        if gamma is not None else None
    dbeta = dyg.sum(axis=(0, 1, 3), dtype=xp.float64).astype(x_hat.dtype) if has_beta else None
    return dx, dgamma, dbeta


# -- mean-only batch norm (Salimans & Kingma 2016) --------------------------------

def mean_only_batch_norm_forward(x, beta, chunk=None):
    """y = x - mean_B(x) + beta, per channel (no variance division, no gamma).

    Salimans & Kingma pair this with weight norm: WN fixes the scale of the
    pre-activation through g, mean-only BN removes its (batch) mean.  It has no
    gamma; put it after a WN layer with ``gain=True`` for a learnable scale.

    Parameters
    ----------
    x : (N, C, H, W) or (N, D);  beta : (C,) or None;  chunk : as in batch_norm

    Returns y and a :class:`BatchNormCache` (``var`` / ``inv_std`` are None;
    ``batch_mean`` gives the (C,) mean for the running average).
    """
    xp = get_array_module(x)
    layout = _layout(x, "mean_only_batch_norm", chunk, training=True)
    _check_channel_param(beta, "beta", layout[2], "mean_only_batch_norm")
    xg = _grouped(x, layout)
    mean = xg.mean(axis=(1, 3), dtype=xp.float64)                     # (G, C)
    y = xg - _bcast(mean, x.dtype)
    if beta is not None:
        y += _chan(beta, x.dtype)
    cache = BatchNormCache(None, mean, None, None, None, beta is not None, chunk,
                           layout[1] * layout[3], extra=layout)
    return _ungrouped(y, x), cache


def mean_only_batch_norm_backward(dy, cache):
    """dx = dy - mean(dy) over each chunk's (k, H, W);  dbeta = sum dy.

    Returns (dx, dbeta); dbeta is None when the forward got beta=None.
    """
    xp = get_array_module(dy)
    layout = cache.extra
    dyg = _grouped(dy, layout)
    mean_dy = dyg.mean(axis=(1, 3), dtype=xp.float64)                 # (G, C)
    dx = _ungrouped(dyg - _bcast(mean_dy, dy.dtype), dy)
    dbeta = dyg.sum(axis=(0, 1, 3), dtype=xp.float64).astype(dy.dtype) if cache.has_beta else None
    return dx, dbeta


# -- batch renormalization (Ioffe 2017) ------------------------------------------

def batch_renorm_forward(x, gamma, beta, running_mean, running_var, eps, r_max, d_max):
    """Batch renormalization, training mode.

    With sigma_B = sqrt(var_B + eps) and sigma = sqrt(running_var + eps):

        r = clip(sigma_B / sigma, 1/r_max, r_max)
        d = clip((mean_B - running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mean_B) / sigma_B * r + d
        y = gamma * x_hat + beta

    r and d are per channel and are constants for the gradient (Ioffe's
    stop_gradient).  r_max = 1, d_max = 0 is plain batch norm; when neither is
    clipped, y equals the eval-mode map with the running statistics.

    Parameters
    ----------
    x : (N, C, H, W) or (N, D);  gamma, beta : (C,) or None
    running_mean, running_var : (C,) current running statistics (not updated here)
    eps : float;  r_max >= 1, d_max >= 0 : clipping bounds

    Returns y and a :class:`BatchNormCache` whose ``extra`` is (r, d), (C,) float64.
    """
    xp = get_array_module(x)
    if r_max < 1 or d_max < 0:
        raise ValueError(f"batch_renorm: need r_max >= 1 and d_max >= 0, got r_max={r_max}, "
                         f"d_max={d_max}")
    layout = _layout(x, "batch_renorm", training=True)
    check_eps("batch_renorm", eps)
    c = layout[2]
    for p, pname in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"),
                     (running_var, "running_var")):
        _check_channel_param(p, pname, c, "batch_renorm")
    xg = _grouped(x, layout)
    mean, var, inv_std = _stats(xg, eps)                          # (1, C)
    sigma = xp.sqrt(running_var.astype(xp.float64) + eps)         # (C,)
    r = xp.clip(1.0 / (inv_std[0] * sigma), 1.0 / r_max, r_max)
    d = xp.clip((mean[0] - running_mean.astype(xp.float64)) / sigma, -d_max, d_max)
    x_hat = (xg - _bcast(mean, x.dtype)) * _bcast(inv_std * r, x.dtype) + _chan(d, x.dtype)
    y = x_hat * _chan(gamma, x.dtype) if gamma is not None else x_hat.copy()
    if beta is not None:
        y += _chan(beta, x.dtype)
    cache = BatchNormCache(x, mean, var, inv_std, gamma, beta is not None, None,
                           layout[1] * layout[3], extra=(r, d))
    return _ungrouped(y, x), cache


def batch_renorm_backward(dy, cache):
    """Gradients of batch renorm with r, d held constant.

    With x_hat0 = (x - mean_B) * inv_std (the plain BN normalization) and
    x_hat = r * x_hat0 + d, this is batch norm's backward with gamma -> gamma*r:

        dbeta  = sum dy,   dgamma = sum dy * x_hat
        dx     = gamma * r * inv_std / m * (m dy - sum dy - x_hat0 * sum(dy * x_hat0))

    Returns (dx, dgamma, dbeta); None for a parameter the forward got as None.
    """
    xp = get_array_module(dy)
    r, d = cache.extra
    x = cache.x
    layout = _layout(x, "batch_renorm")
    m = cache.count
    dyg = _grouped(dy, layout)
    x_hat0 = (_grouped(x, layout) - _bcast(cache.mean, x.dtype)) * _bcast(cache.inv_std, x.dtype)
    sum_dy = dyg.sum(axis=(1, 3), dtype=xp.float64)                   # (1, C)
    sum_dy_xhat0 = (dyg * x_hat0).sum(axis=(1, 3), dtype=xp.float64)  # (1, C)
    scale = cache.inv_std * r[None, :] / m
    if cache.gamma is not None:
        scale = scale * cache.gamma.astype(xp.float64)[None, :]
    dx = _bcast(scale, x.dtype) * (m * dyg - _bcast(sum_dy, x.dtype)
                                   - x_hat0 * _bcast(sum_dy_xhat0, x.dtype))
    # sum dy * (r x_hat0 + d) = r * sum(dy x_hat0) + d * sum(dy)
    dgamma = (r * sum_dy_xhat0[0] + d * sum_dy[0]).astype(x.dtype) \
        if cache.gamma is not None else None
    dbeta = sum_dy[0].astype(x.dtype) if cache.has_beta else None
    return _ungrouped(dx, x), dgamma, dbeta


# -- `tinynorm gradcheck` --------------------------------------------------------

def _no_gradient_for_statistics(backward):
    # the fixed statistics (mean, var / running_mean, running_var) are constants:
    # say so to gradcheck with None gradients rather than leave them unchecked
    return lambda dy, cache: (*backward(dy, cache), None, None)


def gradcheck_cases():
    """(op_label, forward, backward, args, names) for ``python -m tinynorm gradcheck``."""
    rng = np.random.default_rng(7)

    def randn(*shape):
        return rng.standard_normal(shape)

    x4 = randn(6, 3, 4, 5) * 2.0 + 0.5
    x2 = randn(8, 5) * 1.5 - 0.3
    g3, b3 = randn(3) + 1.0, randn(3)
    g5, b5 = randn(5) + 1.0, randn(5)
    # batch renorm: running statistics chosen so r and d sit at their clips
    # (locally constant, so finite differences agree with the stop-gradient
    # backward): sigma_B << sigma -> r = 1/r_max; mean_B - mu >> d_max sigma -> d = d_max
    rmean_lo, rvar_hi = np.full(3, -80.0), np.full(3, 100.0)
    rmean_hi, rvar_lo = np.full(3, 40.0), np.full(3, 0.01)
    cases = [
        ("batch_norm 4-D", batch_norm_forward, batch_norm_backward,
         (x4, g3, b3, 1e-5), ("x", "gamma", "beta", "eps")),
        ("batch_norm 2-D", batch_norm_forward, batch_norm_backward,
         (x2, g5, b5, 1e-5), ("x", "gamma", "beta", "eps")),
        ("batch_norm chunk=2", lambda x, g, b: batch_norm_forward(x, g, b, 1e-5, chunk=2),
         batch_norm_backward, (x4, g3, b3), ("x", "gamma", "beta")),
        ("batch_norm reference chunk=3",
         lambda x, g, b: batch_norm_forward_reference(x, g, b, 1e-5, chunk=3),
         batch_norm_backward_reference, (x4, g3, b3), ("x", "gamma", "beta")),
        ("batch_norm_inference", batch_norm_inference_forward,
         _no_gradient_for_statistics(batch_norm_inference_backward),
         (x4, g3, b3, randn(3), np.abs(randn(3)) + 0.5, 1e-5),
         ("x", "gamma", "beta", "mean", "var", "eps")),
        ("mean_only_batch_norm", mean_only_batch_norm_forward, mean_only_batch_norm_backward,
         (x4, b3), ("x", "beta")),
        ("mean_only_batch_norm chunk=3",
         lambda x, b: mean_only_batch_norm_forward(x, b, chunk=3),
         mean_only_batch_norm_backward, (x4, b3), ("x", "beta")),
        ("batch_renorm r,d clipped low/high", batch_renorm_forward,
         _no_gradient_for_statistics(batch_renorm_backward),
         (x4, g3, b3, rmean_lo, rvar_hi, 1e-5, 3.0, 5.0),
         ("x", "gamma", "beta", "running_mean", "running_var", "eps", "r_max", "d_max")),
        ("batch_renorm r,d clipped high/low", batch_renorm_forward,
         _no_gradient_for_statistics(batch_renorm_backward),
         (x4, g3, b3, rmean_hi, rvar_lo, 1e-5, 2.0, 1.0),
         ("x", "gamma", "beta", "running_mean", "running_var", "eps", "r_max", "d_max")),
        ("batch_renorm r_max=1 d_max=0", batch_renorm_forward,
         _no_gradient_for_statistics(batch_renorm_backward),
         (x2, g5, b5, randn(5), np.abs(randn(5)) + 0.5, 1e-5, 1.0, 0.0),
         ("x", "gamma", "beta", "running_mean", "running_var", "eps", "r_max", "d_max")),
    ]
    if fused_kernel_available(x4):  # the numba kernels themselves, whatever the size
        cases.append(("batch_norm fused kernel chunk=3",
                      lambda x, g, b: batch_norm_forward_fused(x, g, b, 1e-5, chunk=3),
                      batch_norm_backward_fused, (x4, g3, b3), ("x", "gamma", "beta")))
        cases.append(("batch_norm fused kernel", batch_norm_forward_fused,
                      batch_norm_backward_fused, (x4, g3, b3, 1e-5),
                      ("x", "gamma", "beta", "eps")))
    return cases

"""Per-sample normalizations: layer norm (Ba et al. 2016) and group norm
(Wu & He 2018); instance norm is group norm with groups = C.

Neither uses batch statistics, so training and evaluation are the same
function and the batch size does not matter.

    group_norm: x (N, C, ...) is cut along C into G groups of C/G channels;
        each (sample, group) is normalized over its C/G * H * W values:
        x_hat = (x - mean_ng) / sqrt(var_ng + eps),  y = gamma_c x_hat + beta_c
    layer_norm: group_norm with G = 1 -- every sample normalized over all its
        axes but 0; gamma and beta stay per channel (C,) for 4-D input (per
        feature (D,) for 2-D), as in group norm.

A group whose values are all equal (one channel of a 1x1 map with G = C, or
a 2-D input with G = D) has var = 0: x_hat = 0, y = beta and dx = 0.  Allowed.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ._checks import check_eps

__all__ = ["group_norm_forward", "group_norm_backward", "layer_norm_forward",
           "layer_norm_backward"]


def _check(x, gamma, beta, groups, name):
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
        raise ValueError(f"{name}: x must be a floating-point array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2:
        raise ValueError(f"{name}: x must be (N, C, ...) with at least 2 dims, got shape "
                         f"{tuple(x.shape)}")
    c = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"{name}: groups must be a positive integer, got {groups!r}")
    if c % groups:
        raise ValueError(f"{name}: {c} channels cannot be split into {groups} groups "
                         f"(C must be divisible by groups)")
    for p, pname in ((gamma, "gamma"), (beta, "beta")):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"{name}: {pname} has shape {tuple(p.shape)} but x has {c} "
                             f"channels (expected ({c},))")


def _chan3(p, dtype):
    # (C,) -> (1, C, 1), broadcastable against the (N, C, S) view
    return p[None, :, None].astype(dtype, copy=False)


def group_norm_forward(x, gamma, beta, groups, eps):
    """Group normalization.

    Parameters
    ----------
    x : (N, C, H, W) or (N, C) (any (N, C, ...))
    gamma, beta : (C,) or None (1 / 0, no gradient returned)
    groups : G, a divisor of C (1: layer norm, C: instance norm)
    eps : float > 0 added to the variance (ValueError otherwise)

    Returns
    -------
    y : like x
    cache : (x_hat (N, C, S), inv_std (N, G) float64, gamma, has_beta, shape, G)
        with S = H * W (1 for 2-D input); ``mean`` and ``var`` of the forward are
        not needed by the backward and not kept.
    """
    xp = get_array_module(x)
    _check(x, gamma, beta, groups, "group_norm")
    check_eps("group_norm", eps)
    n, c = x.shape[0], x.shape[1]
    # (N, C, ...) -> (N, G, M) with M = C/G * S values per statistic
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(axis=2, dtype=xp.float64)                          # (N, G)
    xc = xg - mean[:, :, None].astype(x.dtype)
    var = (xc * xc).mean(axis=2, dtype=xp.float64)                    # (N, G)
    inv_std = 1.0 / xp.sqrt(var + eps)
    x_hat = (xc * inv_std[:, :, None].astype(x.dtype)).reshape(n, c, -1)   # (N, C, S)
    y = x_hat * _chan3(gamma, x.dtype) if gamma is not None else x_hat.copy()
    if beta is not None:
        y += _chan3(beta, x.dtype)
    return y.reshape(x.shape), (x_hat, inv_std, gamma, beta is not None, x.shape, groups)


def group_norm_backward(dy, cache):
    """Gradients of group norm.

    With g = dy * gamma (per channel) and M values per (sample, group):

        dbeta_c  = sum_{n, s} dy
        dgamma_c = sum_{n, s} dy * x_hat
        dx       = inv_std / M * (M g - sum(g) - x_hat * sum(g * x_hat))

    where the sums in dx run over each (sample, group)'s M values.

    Returns (dx, dgamma, dbeta); None for a parameter the forward got as None.
    """
    xp = get_array_module(dy)
    x_hat, inv_std, gamma, has_beta, shape, groups = cache
    n, c = shape[0], shape[1]
    dy3 = dy.reshape(n, c, -1)                                        # (N, C, S)
    dgamma = (dy3 * x_hat).sum(axis=(0, 2), dtype=xp.float64).astype(gamma.dtype) \
        if gamma is not None else None
    dbeta = dy3.sum(axis=(0, 2), dtype=xp.float64).astype(dy.dtype) if has_beta else None
    g = dy3 * _chan3(gamma, dy.dtype) if gamma is not None else dy3
    # (N, C, S) -> (N, G, M)
    g = g.reshape(n, groups, -1)
    xh = x_hat.reshape(n, groups, -1)
    m = xh.shape[2]
    sum_g = g.sum(axis=2, dtype=xp.float64)[:, :, None].astype(dy.dtype)
    sum_gx = (g * xh).sum(axis=2, dtype=xp.float64)[:, :, None].astype(dy.dtype)
    dx = (inv_std / m)[:, :, None].astype(dy.dtype) * (m * g - sum_g - xh * sum_gx)
    return dx.reshape(shape), dgamma, dbeta


def layer_norm_forward(x, gamma, beta, eps):
    """Layer normalization: each sample normalized over all axes but 0.

    Parameters
    ----------
    x : (N, C, H, W) or (N, D);  gamma, beta : (C,) / (D,) or None;  eps : float

    Returns y (like x) and the cache of :func:`group_norm_forward` with G = 1.
    """
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"layer_norm: x must be (N, C, ...) with at least 2 dims, got "
                         f"shape {tuple(getattr(x, 'shape', ()))}")
    return group_norm_forward(x, gamma, beta, 1, eps)


def layer_norm_backward(dy, cache):
    """Group norm's backward with G = 1 (M = C * H * W):

        dx = inv_std / M * (M g - sum(g) - x_hat * sum(g * x_hat)),  g = dy * gamma

    summed over each sample; dgamma = sum dy * x_hat, dbeta = sum dy per channel.
    Returns (dx, dgamma, dbeta).
    """
    return group_norm_backward(dy, cache)


def gradcheck_cases():
    """(op_label, forward, backward, args, names) for ``python -m tinynorm gradcheck``."""
    rng = np.random.default_rng(19)
    x4 = rng.standard_normal((3, 4, 3, 5)) * 1.5 + 0.7
    x2 = rng.standard_normal((4, 6))
    g4, b4 = rng.standard_normal(4) + 1.0, rng.standard_normal(4)
    return [
        ("layer_norm 4-D", layer_norm_forward, layer_norm_backward,
         (x4, g4, b4, 1e-5), ("x", "gamma", "beta", "eps")),
        ("layer_norm 2-D", layer_norm_forward, layer_norm_backward,
         (x2, rng.standard_normal(6) + 1.0, rng.standard_normal(6), 1e-5),
         ("x", "gamma", "beta", "eps")),
        ("group_norm G=2", group_norm_forward, group_norm_backward,
         (x4, g4, b4, 2, 1e-5), ("x", "gamma", "beta", "groups", "eps")),
        ("group_norm G=C (instance norm)", group_norm_forward, group_norm_backward,
         (x4, g4, b4, 4, 1e-5), ("x", "gamma", "beta", "groups", "eps")),
        ("group_norm G=1", group_norm_forward, group_norm_backward,
         (x4, g4, b4, 1, 1e-5), ("x", "gamma", "beta", "groups", "eps")),
    ]

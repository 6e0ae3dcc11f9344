"""Translated ReLU (Xiang & Li 2017) and the per-channel scale-and-shift that
ends a TReLU WN network (paper section 3.2).

    trelu:        y = relu(x - alpha) + alpha = max(x, alpha),  alpha per channel
    scale_shift:  y = gamma * x + beta,                         per channel

"Per channel" is axis 1: x is (N, C, H, W) or (N, C) and alpha, gamma, beta
are (C,).  In TReLU WN the hidden layers are o = TReLU_alpha(W*x / ||W||)
(no gain, no bias, alpha learnable and started at 0); only the last layer's
output gets gamma and beta, through ``scale_shift``.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module

__all__ = ["trelu_forward", "trelu_backward", "scale_shift_forward", "scale_shift_backward"]


def _check(x, params, name):
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
        raise ValueError(f"{name}: x must be a floating-point array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2:
        raise ValueError(f"{name}: x must be (N, C, ...) with at least 2 dims, got shape "
                         f"{tuple(x.shape)}")
    for p, pname in params:
        if p is not None and tuple(p.shape) != (x.shape[1],):
            raise ValueError(f"{name}: {pname} has shape {tuple(p.shape)} but x has "
                             f"{x.shape[1]} channels (expected ({x.shape[1]},))")


def _chan(p, x):
    # (C,) -> (1, C, 1, ..., 1), broadcastable against x, in x's dtype
    return p.reshape((1, -1) + (1,) * (x.ndim - 2)).astype(x.dtype, copy=False)


def _reduce_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def trelu_forward(x, alpha):
    """y = relu(x - alpha) + alpha.

    Parameters
    ----------
    x : (N, C, H, W) or (N, C);  alpha : (C,)

    Returns y (like x) and the cache (mask x > alpha, alpha's dtype).
    """
    xp = get_array_module(x)
    _check(x, [(alpha, "alpha")], "trelu")
    a = _chan(alpha, x)
    mask = x > a
    y = xp.maximum(x, a)
    return y, (mask, alpha.dtype)


def trelu_backward(dy, cache):
    """dx = dy * [x > alpha];  dalpha_c = sum over (N, H, W) of dy * [x <= alpha].

    (At x = alpha the subgradient goes to alpha.)  Returns (dx, dalpha).
    """
    xp = get_array_module(dy)
    mask, alpha_dtype = cache
    dx = dy * mask
    dalpha = (dy - dx).sum(axis=_reduce_axes(dy), dtype=xp.float64).astype(alpha_dtype)
    return dx, dalpha


def scale_shift_forward(x, gamma, beta):
    """y = gamma * x + beta per channel; gamma or beta may be None (1 / 0).

    Parameters
    ----------
    x : (N, C, H, W) or (N, C);  gamma, beta : (C,) or None

    Returns y (like x) and the cache.
    """
    _check(x, [(gamma, "gamma"), (beta, "beta")], "scale_shift")
    y = x * _chan(gamma, x) if gamma is not None else x.copy()
    if beta is not None:
        y += _chan(beta, x)
    return y, (x if gamma is not None else None, gamma, beta is not None)


def scale_shift_backward(dy, cache):
    """dx = gamma * dy;  dgamma = sum dy * x;  dbeta = sum dy  (sums over all but axis 1).

    Returns (dx, dgamma, dbeta); None for a parameter the forward got as None.
    """
    xp = get_array_module(dy)
    x, gamma, has_beta = cache
    axes = _reduce_axes(dy)
    dx = dy * _chan(gamma, dy) if gamma is not None else dy
    dgamma = (dy * x).sum(axis=axes, dtype=xp.float64).astype(gamma.dtype) \
        if gamma is not None else None
    dbeta = dy.sum(axis=axes, dtype=xp.float64).astype(dy.dtype) if has_beta else None
    return dx, dgamma, dbeta


def gradcheck_cases():
    """(op_label, forward, backward, args, names) for ``python -m tinynorm gradcheck``."""
    rng = np.random.default_rng(17)
    x4 = rng.standard_normal((4, 3, 5, 5))
    alpha3 = np.array([-0.3, 0.1, 0.4])
    # keep x away from the kink x = alpha
    x4[np.abs(x4 - alpha3[None, :, None, None]) < 1e-3] += 0.1
    x2 = rng.standard_normal((6, 4))
    alpha4 = np.array([0.2, -0.5, 0.0, 0.35])
    x2[np.abs(x2 - alpha4) < 1e-3] += 0.1
    # the TReLU WN unit (WN conv without gain, then trelu) is checked as the models
    # build it: tinynorm.norms.gradcheck_cases
    return [
        ("trelu 4-D", trelu_forward, trelu_backward, (x4, alpha3), ("x", "alpha")),
        ("trelu 2-D", trelu_forward, trelu_backward, (x2, alpha4), ("x", "alpha")),
        ("scale_shift", scale_shift_forward, scale_shift_backward,
         (x4, rng.standard_normal(3), rng.standard_normal(3)), ("x", "gamma", "beta")),
    ]

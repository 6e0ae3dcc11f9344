"""Weight normalization (Salimans & Kingma 2016), as the paper writes it:

    w_j = g_j * v_j / (||v_j|| + eps)

and, with ``scale`` s != 1, w_j = g_j * v_j / (s (||v_j|| + eps)): NormProp's
units divide by 1.21 ||W_j|| (see :mod:`tinynorm.ops.normprop`).

one norm per output unit j (axis 0 of v), the Frobenius norm over every other
axis: (C_out, C_in, kh, kw) conv weights -> C_out norms over (C_in, kh, kw);
(D_out, D_in) linear weights -> D_out norms over D_in.  ``g`` may be None
(w = v / (||v|| + eps); the TReLU WN layers have no gain).

Facts the tests hold: ||w_j|| = g_j * ||v_j|| / (||v_j|| + eps)
= g_j / (1 + eps / ||v_j||) and v_j . dv_j = g_j * eps * (dw_j . v_j) / n_j^2:
as eps -> 0 the gradient becomes orthogonal to v (so plain SGD can only grow
||v||).  eps must be > 0 (eps = 0 divides by zero for a zero row of v).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ._checks import check_eps

__all__ = ["weight_norm_forward", "weight_norm_backward", "wn_conv2d_forward", "wn_conv2d_backward",
           "wn_linear_forward", "wn_linear_backward"]


def _unit_shape(v):
    # (C_out,) -> (C_out, 1, ..., 1), broadcastable against v
    return (v.shape[0],) + (1,) * (v.ndim - 1)


def weight_norm_forward(v, g, eps, scale=1.0):
    """w = g * v / (scale * (||v|| + eps)), one norm per output unit.

    Parameters
    ----------
    v : (C_out, ...) float array, at least 2-D: (C_out, C_in, kh, kw) or (D_out, D_in)
    g : (C_out,) or None (gain 1, no dg returned)
    eps : float > 0 added to the norm (ValueError otherwise)
    scale : float > 0 multiplying the norm (1: plain WN; 1.21: NormProp)

    Returns
    -------
    w : like v
    cache : (v, g, norm, n, scale) with norm = ||v_j|| and n = norm + eps, (C_out,) float64
    """
    xp = get_array_module(v)
    if getattr(v, "dtype", None) is None or v.dtype.kind != "f":
        raise ValueError(f"weight_norm: v must be a floating-point array, got "
                         f"{getattr(v, 'dtype', type(v).__name__)}")
    if v.ndim < 2:
        raise ValueError(f"weight_norm: v must be at least 2-D (C_out, ...), got shape "
                         f"{tuple(v.shape)}")
    if g is not None and tuple(g.shape) != (v.shape[0],):
        raise ValueError(f"weight_norm: g has shape {tuple(g.shape)} but v has {v.shape[0]} "
                         f"output units (expected ({v.shape[0]},))")
    check_eps("weight_norm", eps)
    if not scale > 0:
        raise ValueError(f"weight_norm: scale must be > 0, got {scale}")
    axes = tuple(range(1, v.ndim))
    norm = xp.sqrt((v * v).sum(axis=axes, dtype=xp.float64))        # (C_out,)
    n = norm + eps
    factor = 1.0 / (scale * n) if g is None else g.astype(xp.float64) / (scale * n)
    w = v * factor.reshape(_unit_shape(v)).astype(v.dtype)
    return w, (v, g, norm, n, float(scale))


def weight_norm_backward(dw, cache):
    """Gradients of w = g * v / (s n), n = ||v|| + eps, s the forward's scale.

    Per output unit j, with dot_j = dw_j . v_j:

        dg_j = dot_j / (s n_j)
        dv_j = (g_j / (s n_j)) * (dw_j - dot_j * v_j / (||v_j|| n_j))

    (g_j = 1 when g is None; the radial term does not depend on s.)  A unit with v_j = 0 gets dv_j = g_j dw_j / eps,
    the exact derivative there for eps > 0 (the radial term, whose 1/||v|| is
    undefined at 0, is multiplied by v_j = 0 and dropped).

    Parameters
    ----------
    dw : like v
    cache : from :func:`weight_norm_forward`

    Returns (dv, dg); dg is None when the forward got g=None.
    """
    xp = get_array_module(dw)
    v, g, norm, n, scale = cache
    axes = tuple(range(1, v.ndim))
    dot = (dw * v).sum(axis=axes, dtype=xp.float64)                   # (C_out,)
    gain = xp.ones_like(n) if g is None else g.astype(xp.float64)
    safe_norm = xp.where(norm > 0, norm, 1.0)
    radial = xp.where(norm > 0, dot / (safe_norm * n), 0.0)            # (C_out,)
    shape = _unit_shape(v)
    dv = (gain / (scale * n)).reshape(shape).astype(v.dtype) * \
        (dw - radial.reshape(shape).astype(v.dtype) * v)
    dg = (dot / (scale * n)).astype(v.dtype) if g is not None else None
    return dv, dg


# -- weight norm composed with conv / linear (what WNConv2d / WNLinear compute) --

def wn_conv2d_forward(x, v, g, b, stride, pad, eps, scale=1.0):
    """y = conv2d(x, weight_norm(v, g, eps, scale), b): the WNConv2d layer as one op pair.

    x (N, C_in, H, W); v (C_out, C_in, kh, kw); g, b (C_out,) or None.
    """
    from .conv import conv2d_forward
    w, wn_cache = weight_norm_forward(v, g, eps, scale)
    y, conv_cache = conv2d_forward(x, w, b, stride, pad)
    return y, (wn_cache, conv_cache)


def wn_conv2d_backward(dy, cache):
    """Chain rule: (dx, dw, db) from conv2d_backward, then (dv, dg) from
    weight_norm_backward(dw).  Returns (dx, dv, dg, db)."""
    from .conv import conv2d_backward
    wn_cache, conv_cache = cache
    dx, dw, db = conv2d_backward(dy, conv_cache)
    dv, dg = weight_norm_backward(dw, wn_cache)
    return dx, dv, dg, db


def wn_linear_forward(x, v, g, b, eps, scale=1.0):
    """y = linear(x, weight_norm(v, g, eps, scale), b): the WNLinear layer as one op pair.

    x (N, D_in); v (D_out, D_in); g, b (D_out,) or None.
    """
    from .linear import linear_forward
    w, wn_cache = weight_norm_forward(v, g, eps, scale)
    y, lin_cache = linear_forward(x, w, b)
    return y, (wn_cache, lin_cache)


def wn_linear_backward(dy, cache):
    """Chain rule as :func:`wn_conv2d_backward`.  Returns (dx, dv, dg, db)."""
    from .linear import linear_backward
    wn_cache, lin_cache = cache
    dx, dw, db = linear_backward(dy, lin_cache)
    dv, dg = weight_norm_backward(dw, wn_cache)
    return dx, dv, dg, db


def _have(module, name):
    import importlib
    return hasattr(importlib.import_module(f"tinynorm.ops.{module}"), name)


def gradcheck_cases():
    """(op_label, forward, backward, args, names) for ``python -m tinynorm gradcheck``."""
    rng = np.random.default_rng(11)
    v_conv = rng.standard_normal((4, 3, 3, 3))
    v_lin = rng.standard_normal((5, 7))
    cases = []
    if _have("conv", "conv2d_forward"):
        cases.append(("WN conv (weight_norm -> conv2d)", wn_conv2d_forward, wn_conv2d_backward,
                      (rng.standard_normal((2, 3, 6, 6)), v_conv, rng.standard_normal(4) + 1.5,
                       rng.standard_normal(4), 2, 1, 1e-3),
                      ("x", "v", "g", "b", "stride", "pad", "eps")))
    if _have("linear", "linear_forward"):
        cases.append(("WN linear (weight_norm -> linear)", wn_linear_forward, wn_linear_backward,
                      (rng.standard_normal((6, 7)), v_lin, rng.standard_normal(5) + 1.5,
                       rng.standard_normal(5), 1e-3), ("x", "v", "g", "b", "eps")))
    return cases + [
        ("weight_norm conv", weight_norm_forward, weight_norm_backward,
         (v_conv, rng.standard_normal(4) + 1.5, 1e-3), ("v", "g", "eps")),
        ("weight_norm linear", weight_norm_forward, weight_norm_backward,
         (v_lin, rng.standard_normal(5), 1e-12), ("v", "g", "eps")),
        ("weight_norm scale=1.21 (NormProp)", weight_norm_forward, weight_norm_backward,
         (v_conv, rng.standard_normal(4) + 1.5, 1e-3, 1.21), ("v", "g", "eps", "scale")),
        ("weight_norm no gain", lambda v: weight_norm_forward(v, None, 1e-2),
         lambda dw, cache: weight_norm_backward(dw, cache)[:1], (v_conv,), ("v",)),
    ]

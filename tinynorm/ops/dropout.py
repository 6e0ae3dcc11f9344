"""Inverted dropout.

    train: y = x * m,  m = keep / (1 - p),  keep ~ Bernoulli(1 - p) per element
    eval, or p == 0: y = x (the same array, not a copy)

Scaling by 1/(1 - p) at training time keeps E[y] = x, so evaluation needs no
rescaling.  ``rng`` is a ``numpy.random.Generator`` (or CuPy's generator for
CuPy arrays; see ``tinynorm.backend.default_rng``); the mask is drawn with
``rng.random``, so a seeded generator gives a reproducible mask.
"""
from __future__ import annotations

import numpy as np

from .. import backend

__all__ = ["dropout_forward", "dropout_backward", "gradcheck_cases"]


def dropout_forward(x, p, rng, train):
    """Inverted dropout.

    x : any shape, float;  p : drop probability, 0 <= p < 1;
    rng : random generator (may be None when it is not needed);
    train : bool.  Returns y (shape of x) and the cache (the scaled mask
    m, shape of x and dtype of x, or None for the identity).
    """
    if not backend.is_array(x):
        raise ValueError(f"dropout: x must be a NumPy or CuPy array; got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise ValueError(f"dropout: x must be a floating-point array; got dtype {x.dtype}")
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout: p must be a number in [0, 1); got {p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1); got {p!r}")
    if not train or p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout: rng is required in training mode with p > 0")
    draw_dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    u = rng.random(x.shape, dtype=draw_dtype)
    xp = backend.get_array_module(x)
    # mask: 1/(1-p) where kept, 0 where dropped, in x's dtype
    mask = (u >= p).astype(x.dtype)
    mask *= xp.asarray(1.0 / (1.0 - p), dtype=x.dtype)
    return x * mask, mask


def dropout_backward(dy, cache):
    """dx = dy * m with the forward's scaled mask m (dx = dy for the identity).

    dy : shape of x.  Returns ``(dx,)``.
    """
    mask = cache
    if mask is None:
        return (dy,)
    if tuple(dy.shape) != tuple(mask.shape):
        raise ValueError(f"dropout_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{tuple(mask.shape)} (the forward output's shape)")
    return (dy * mask,)


def gradcheck_cases():
    """The mask is fixed by re-seeding the generator on every forward call."""
    rng = np.random.default_rng(5)

    def seeded(p, seed):
        def forward(x):
            return dropout_forward(x, p, np.random.default_rng(seed), True)
        return forward

    return [(f"dropout p={p}", seeded(p, 11), dropout_backward,
             (rng.standard_normal(shape),), ("x",))
            for p, shape in [(0.5, (4, 6)), (0.2, (2, 3, 4, 4))]]

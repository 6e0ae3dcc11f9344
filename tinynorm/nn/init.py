"""Seeded weight initializations.

``fan_in = C_in * kh * kw`` and ``fan_out = C_out * kh * kw`` for conv weights
(C_out, C_in, kh, kw); ``fan_in = D_in``, ``fan_out = D_out`` for linear
weights (D_out, D_in).
"""
from __future__ import annotations

import numpy as np

__all__ = ["fans", "xavier_uniform", "he_normal", "initialize"]


def fans(shape):
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def xavier_uniform(shape, rng, dtype=np.float32):
    """Glorot & Bengio (2010), the paper's init: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(dtype)


def he_normal(shape, rng, dtype=np.float32):
    """He et al. (2015): N(0, 2 / fan_in)."""
    fan_in, _ = fans(shape)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


INITS = {"xavier": xavier_uniform, "he": he_normal}


def initialize(name, shape, rng, dtype=np.float32):
    try:
        return INITS[name](shape, rng, dtype)
    except KeyError:
        raise ValueError(f"unknown init {name!r}; choose from {sorted(INITS)}") from None

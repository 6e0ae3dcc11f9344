"""Fully connected layer: y = x w^T + b.

Shapes: x (N, D_in), w (D_out, D_in), b (D_out,) or None, y (N, D_out).
Flatten image batches first (``x.reshape(N, -1)``).  One GEMM per pass, on
NumPy or CuPy alike.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ._checks import check_bias_and_backend

__all__ = ["linear_forward", "linear_backward", "gradcheck_cases"]

_OP = "linear"


def _check_args(x, w, b):
    for name, a in (("x", x), ("w", w)):
        if not backend.is_array(a):
            raise ValueError(f"{_OP}: {name} must be a NumPy or CuPy array; "
                             f"got {type(a).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{_OP}: x must be 2-D (N, D_in); got shape {tuple(x.shape)} "
                         f"(flatten image batches first: x.reshape(N, -1))")
    if w.ndim != 2:
        raise ValueError(f"{_OP}: w must be 2-D (D_out, D_in); got shape {tuple(w.shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{_OP}: x must be a floating-point array; got dtype {x.dtype}")
    if w.dtype != x.dtype:
        raise ValueError(f"{_OP}: dtype mismatch: x is {x.dtype} but w is {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{_OP}: feature mismatch: x has D_in={x.shape[1]} features "
                         f"(shape {tuple(x.shape)}) but w expects D_in={w.shape[1]} "
                         f"(shape {tuple(w.shape)})")
    return check_bias_and_backend(_OP, x, w, b, "output feature")


def linear_forward(x, w, b=None):
    """y = x @ w.T + b.

    x : (N, D_in);  w : (D_out, D_in);  b : (D_out,) or None
    Returns y (N, D_out), C-contiguous, and the cache ``(x, w, has_bias)``.
    """
    _check_args(x, w, b)
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """Gradients of y = x w^T + b:

        dx = dy @ w          (N, D_in)
        dw = dy^T @ x        (D_out, D_in)
        db = sum_n dy[n]     (D_out,), None without bias

    dy : (N, D_out).  Returns ``(dx, dw, db)``.
    """
    x, w, has_bias = cache
    if tuple(dy.shape) != (x.shape[0], w.shape[0]):
        raise ValueError(f"{_OP}_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{(x.shape[0], w.shape[0])} (the forward output's shape)")
    dx = dy @ w
    dw = dy.T @ x
    db = dy.sum(axis=0) if has_bias else None
    return dx, dw, db


def gradcheck_cases():
    """Small float64 cases, with and without bias, batch 1 and 5."""
    rng = np.random.default_rng(1)
    cases = []
    for n, d_in, d_out, bias in [(5, 7, 4, True), (1, 6, 3, True), (4, 3, 5, False)]:
        x = rng.standard_normal((n, d_in))
        w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
        b = rng.standard_normal(d_out) if bias else None
        cases.append((f"linear {d_in}->{d_out} N={n}{'' if bias else ' no bias'}",
                      linear_forward, linear_backward, (x, w, b), ("x", "w", "b")))
    return cases

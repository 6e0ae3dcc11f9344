"""Input checks shared by the ops that take a weight and an optional bias."""
from __future__ import annotations

from .. import backend


def check_bias_and_backend(op, x, w, b, unit):
    """Check ``b`` (None, or one value per ``unit`` of w's axis 0, x's dtype) and that
    x, w, b share one backend; return that array module.  Errors name ``op``."""
    arrays = [x, w]
    if b is not None:
        if not backend.is_array(b):
            raise ValueError(f"{op}: b must be an array or None; got {type(b).__name__}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{op}: bias shape mismatch: b has shape {tuple(b.shape)}, "
                             f"expected ({w.shape[0]},) (one per {unit})")
        if b.dtype != x.dtype:
            raise ValueError(f"{op}: dtype mismatch: x is {x.dtype} but b is {b.dtype}")
        arrays.append(b)
    xp = backend.get_array_module(*arrays)
    if any(backend.get_array_module(a) is not xp for a in arrays):
        raise ValueError(f"{op}: x, w and b must all be NumPy or all CuPy arrays")
    return xp


def check_eps(op, eps):
    """eps must be a finite number > 0: with eps = 0 a constant channel (or a zero
    weight row) divides 0 by 0, and eps < 0 can take a square root of a negative."""
    import math
    import numbers
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
            or not eps > 0:
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")

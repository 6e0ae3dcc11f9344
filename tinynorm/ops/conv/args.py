"""Argument checks of conv2d (the fast op and the reference share them)."""
from __future__ import annotations

from ... import backend
from .._checks import check_bias_and_backend
from .plan import check_dtype, geometry

__all__ = ["check_args", "check_dy"]

OP = "conv2d"


def check_args(x, w, b, stride, pad, op=OP):
    """Validate the forward's arguments; return (xp, kernel, stride, pad, (OH, OW))."""
    if not backend.is_array(x):
        raise ValueError(f"{op}: x must be a NumPy or CuPy array; got {type(x).__name__}")
    if not backend.is_array(w):
        raise ValueError(f"{op}: w must be a NumPy or CuPy array; got {type(w).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{op}: w must be 4-D (C_out, C_in, kh, kw); got shape "
                         f"{tuple(w.shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{op}: x must be a floating-point array; got dtype {x.dtype}")
    check_dtype(x.dtype, op)
    if w.dtype != x.dtype:
        raise ValueError(f"{op}: dtype mismatch: x is {x.dtype} but w is {w.dtype}")
    kernel, stride, pad, out_hw = geometry(x.shape, w.shape, stride, pad, op)
    xp = check_bias_and_backend(op, x, w, b, "output channel")
    return xp, kernel, stride, pad, out_hw


def check_dy(dy, x, w, out_hw, op=OP):
    """dy must be an array of the forward output's shape and dtype, on the device
    the forward ran on (x's): a NumPy dy for a GPU forward would otherwise reach
    CuPy or cuDNN as host memory."""
    if not backend.is_array(dy):
        raise ValueError(f"{op}_backward: dy must be a NumPy or CuPy array; got "
                         f"{type(dy).__name__}")
    if backend.device_of(dy) != backend.device_of(x):
        raise ValueError(f"{op}_backward: dy is on the {backend.device_of(dy)} but the "
                         f"forward ran on the {backend.device_of(x)}")
    expected = (x.shape[0], w.shape[0], *out_hw)
    if tuple(dy.shape) != expected:
        raise ValueError(f"{op}_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{expected} (the forward output's shape)")
    if dy.dtype != x.dtype:
        raise ValueError(f"{op}_backward: dtype mismatch: dy is {dy.dtype} but the "
                         f"forward ran in {x.dtype}")

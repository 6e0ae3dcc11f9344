"""The ``cudnn`` plan: GPU convolutions through ``cupyx.cudnn``.

NEVER RUN ON A GPU -- written against CuPy 13's documented ``cupyx.cudnn``
signatures on machines without one::

    convolution_forward(x, W, b, y, pad, stride, dilation, groups, *, auto_tune,
                        tensor_core)
    convolution_backward_data(W, gy, b, gx, pad, stride, dilation, groups, *,
                              deterministic, auto_tune, tensor_core)
    convolution_backward_filter(x, gy, gW, pad, stride, dilation, groups, *,
                                deterministic, auto_tune, tensor_core)

each writing into its preallocated output argument.  Without cuDNN (or with
``config.using(use_cudnn=False)``) CuPy arrays take the ``generic`` plan.
"""
from __future__ import annotations

import importlib

import numpy as np

from ... import backend

__all__ = ["available", "forward", "backward"]

_state = {"module": None, "checked": False}


def _cudnn():
    """``cupyx.cudnn`` if it imports (CuPy 13.x with the cuDNN library), else None."""
    if not _state["checked"]:
        _state["checked"] = True
        if backend.cupy is not None:
            try:
                _state["module"] = importlib.import_module("cupyx.cudnn")
            except Exception:  # ImportError, or libcudnn failing to load
                _state["module"] = None
    return _state["module"]


def available() -> bool:
    return _cudnn() is not None


# "auto" lets CuPy decide on tensor cores (it enables them for float16 only);
# float64 gradient checks must not lose precision, so they say "never".
def _tensor_core(dtype):
    return "never" if dtype == np.float64 else "auto"


def forward(x, w, b, plan):
    xp = backend.get_array_module(x)
    y = xp.empty((x.shape[0], w.shape[0], *plan.out_hw), dtype=x.dtype)
    _cudnn().convolution_forward(x, xp.ascontiguousarray(w), b, y, plan.pad, plan.stride,
                                 (1, 1), 1, auto_tune=False,
                                 tensor_core=_tensor_core(x.dtype))
    return y


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    cudnn = _cudnn()
    xp = backend.get_array_module(dy)
    dy = xp.ascontiguousarray(dy)
    dx = dw = None
    if need_dx:
        dx = xp.empty(x.shape, dtype=x.dtype)
        cudnn.convolution_backward_data(xp.ascontiguousarray(w), dy, None, dx, plan.pad,
                                        plan.stride, (1, 1), 1, deterministic=False,
                                        auto_tune=False, tensor_core=_tensor_core(x.dtype))
    if need_dw:
        dw = xp.empty(w.shape, dtype=w.dtype)
        cudnn.convolution_backward_filter(x, dy, dw, plan.pad, plan.stride, (1, 1), 1,
                                          deterministic=False, auto_tune=False,
                                          tensor_core=_tensor_core(x.dtype))
    db = dy.sum(axis=(0, 2, 3)) if need_db else None
    return dx, dw, db

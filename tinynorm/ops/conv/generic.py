"""The ``generic`` plan: array-generic im2col + matmul, for any backend and
float dtype.  The GPU fallback without cuDNN, the CPU path for dtypes the
numba kernels are not compiled for, and every CPU convolution with the
``use_numba`` setting off; the tests run it on NumPy.  Same formulas as
:mod:`.im2col`, over the whole batch at once, with
``_geometry.im2col_reference`` / ``col2im_reference``.
"""
from __future__ import annotations

from ... import backend
from .. import _geometry as geo

__all__ = ["forward", "backward"]


def forward(x, w, b, plan):
    xp = backend.get_array_module(x)
    n = x.shape[0]
    c_out = w.shape[0]
    oh, ow = plan.out_hw
    col = geo.im2col_reference(x, plan.kernel, plan.stride, plan.pad)   # (K, N*P)
    y2 = xp.matmul(w.reshape(c_out, -1), col)                          # (C_out, N*P)
    # (C_out, N, OH, OW) -> (N, C_out, OH, OW)
    y = xp.ascontiguousarray(y2.reshape(c_out, n, oh, ow).transpose(1, 0, 2, 3))
    if b is not None:
        y += b.reshape(1, c_out, 1, 1)
    return y


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    xp = backend.get_array_module(dy)
    c_out = w.shape[0]
    # dy: (N, C_out, OH, OW) -> (C_out, N, OH, OW) -> dY (C_out, N*P)
    dy2 = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(c_out, -1)
    dx = dw = None
    if need_dw:
        col = geo.im2col_reference(x, plan.kernel, plan.stride, plan.pad)  # (K, N*P)
        dw = xp.matmul(dy2, col.T).reshape(w.shape)
    if need_dx:
        dcol = xp.matmul(w.reshape(c_out, -1).T, dy2)                     # (K, N*P)
        dx = geo.col2im_reference(dcol, x.shape, plan.kernel, plan.stride, plan.pad)
    db = dy.sum(axis=(0, 2, 3)) if need_db else None
    return dx, dw, db

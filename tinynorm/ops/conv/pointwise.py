"""The ``pointwise`` plan: 1x1 kernel, stride 1, pad 0 on CPU -- no im2col.

Its col is x with N and C swapped, (C, N*H*W): a transpose, or a view when
N == 1, and col2im is the transpose back.  When the plan says ``stacked``
(the per-sample matrices are wide enough or one channel count is small; see
``plan._use_stacked``), the forward and the input gradient skip even that::

    y[n]  = w2 (C_out, C) @ x[n] (C, P)       one stacked numpy.matmul, NCHW out
    dx[n] = w2.T @ dy[n]

-- N GEMMs inside one NumPy call.  The weight gradient always uses the
single-GEMM form dw = dY @ col.T over the plan's chunks.
"""
from __future__ import annotations

import numpy as np

from .. import _gemm
from . import pipeline

__all__ = ["forward", "backward"]


def _lower(x, serial):
    # 1x1 / stride 1 / pad 0: col (C, n*H*W) is x with N and C swapped
    return pipeline.to_gemm_layout(x, "col", serial=serial)[0]


def _scatter(dcol, chunk_shape, out, serial):
    # the adjoint of the swap: (C, n*P) -> NCHW
    pipeline.from_gemm_layout(dcol, chunk_shape[0], None, out=out, serial=serial)


def forward(x, w, b, plan):
    """y (N, C_out, H, W); x C-contiguous."""
    if not plan.stacked:
        return pipeline.gemm_forward(x, w, b, plan, _lower)
    n, c = x.shape[:2]
    c_out = w.shape[0]
    oh, ow = plan.out_hw
    w2 = np.ascontiguousarray(w).reshape(c_out, c)
    # x3: (N, C, P); (C_out, C) @ (N, C, P) -> (N, C_out, P), NCHW as is
    y = _gemm.matmul(w2, x.reshape(n, c, oh * ow))
    if b is not None:
        y += b.reshape(1, c_out, 1)
    return y.reshape(n, c_out, oh, ow)


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    """(dx, dw, db), each None when not asked for."""
    dy = np.ascontiguousarray(dy)
    if not plan.stacked:
        return pipeline.gemm_backward(dy, x, w, plan, _lower, _scatter, need_dx, need_dw,
                                      need_db)
    n, c, h, v = x.shape
    c_out = w.shape[0]
    dx = None
    if need_dx:
        w2 = np.ascontiguousarray(w).reshape(c_out, c)
        # dy3: (N, C_out, P); (C, C_out) @ (N, C_out, P) -> (N, C, P), NCHW as is
        dx = _gemm.matmul(w2.T, dy.reshape(n, c_out, h * v)).reshape(n, c, h, v)
    _, dw, db = pipeline.gemm_backward(dy, x, w, plan, _lower, _scatter, False, need_dw,
                                       need_db)
    return dx, dw, db

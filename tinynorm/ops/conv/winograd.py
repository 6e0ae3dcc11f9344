"""The ``winograd4`` and ``winograd2`` plans: 3x3 / stride-1 convolutions as
Winograd F(m x m, 3x3) (Lavin & Gray 2016), one driver for both tile sizes.

The kernel modules hold the transforms: :mod:`._winograd4` (F(4x4, 3x3), 36
transform-domain positions, 4x fewer multiply-adds than im2col; the default)
and :mod:`._winograd2` (F(2x2, 3x3), 16 positions, 2.25x fewer; read its
docstring for the scheme).  Per chunk of the batch, with S positions::

    U (S, C_out, C) = filter transform of w            (once per call)
    V (S, C, T)     = input transform of the chunk     (numba)
    M (S, C_out, T) = U @ V                            S GEMMs, one stacked matmul
    y               = output transform of M, + bias    (numba)

The backward passes are the exact transposes of the same maps::

    dM = A dY A^T;  dU += dM @ V^T;  dV = U^T @ dM;  dx = B dV B^T scattered;
    dw = G^T dU G

Both round differently from im2col: F(2x2) within a few float32 ulps of the
result's scale, F(4x4) within 1e-5 of it (its transforms multiply by up to 8;
tested).  float64 results agree with the direct convolution to ~1e-15.
"""
from __future__ import annotations

import numpy as np

from . import pipeline
from .plan import WINOGRAD_KERNELS

__all__ = ["forward", "backward"]


def _tbuf(wg, name, rows, cols, dtype):
    """A (S, rows, cols) transform-domain workspace of ``wg`` (S = 16 or 36;
    see ``_winograd2.transform_buffer``)."""
    itemsize = np.dtype(dtype).itemsize
    return wg.transform_buffer(pipeline.workspace(name, (wg.buffer_size(rows, cols, itemsize),),
                                                  dtype), rows, cols)


def forward(x, w, b, plan):
    """y = A^T [U (x) V] A per tile, chunk by chunk of the batch: S GEMMs
    (C_out, C) @ (C, tiles) per chunk as one stacked ``numpy.matmul``."""
    wg = WINOGRAD_KERNELS[plan.algorithm]
    n, c = x.shape[:2]
    c_out = w.shape[0]
    oh, ow = plan.out_hw
    th, tw = wg.tiles(oh, ow)
    u = wg.filter_transform(np.ascontiguousarray(w))          # (S, C_out, C)
    y = np.empty((n, c_out, oh, ow), dtype=x.dtype)

    def run(chunks, serial):
        for s, e in chunks:
            v = wg.input_transform(x[s:e], plan.pad, _tbuf(wg, "wg_v", c, (e - s) * th * tw,
                                                           x.dtype), serial)
            m = _tbuf(wg, "wg_m", c_out, v.shape[2], x.dtype)
            np.matmul(u, v, out=m)
            wg.output_transform(m, e - s, oh, ow, b, y[s:e], serial)
    pipeline.run_groups(plan, run)
    return y


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    """(dx, dw, db), each None when not asked for, as transposes of the
    forward's maps, chunk by chunk."""
    wg = WINOGRAD_KERNELS[plan.algorithm]
    dy = np.ascontiguousarray(dy)
    n, c, h, v_ = x.shape
    c_out = w.shape[0]
    th, tw = wg.tiles(*plan.out_hw)
    u_t = wg.filter_transform(np.ascontiguousarray(w)).transpose(0, 2, 1) if need_dx else None
    dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None
    if not (need_dx or need_dw or need_db):
        return None, None, None

    def run(chunks, serial):
        du_sum = None
        db_sum = np.zeros(c_out, dtype=np.float64)
        for s, e in chunks:
            t = (e - s) * th * tw
            dm, sums = wg.output_transform_adjoint(dy[s:e], _tbuf(wg, "wg_m", c_out, t, x.dtype),
                                                   serial)
            db_sum += sums
            if need_dw:
                v = wg.input_transform(x[s:e], plan.pad, _tbuf(wg, "wg_v", c, t, x.dtype),
                                       serial)
                part = np.matmul(dm, v.transpose(0, 2, 1))       # (S, C_out, C)
                if du_sum is None:
                    du_sum = part
                else:
                    du_sum += part
            if need_dx:
                dv = _tbuf(wg, "wg_v", c, t, x.dtype)
                np.matmul(u_t, dm, out=dv)
                wg.input_transform_adjoint(dv, (e - s, c, h, v_), plan.pad, dx[s:e], serial)
        return du_sum, db_sum

    du, db = pipeline.sum_partials(pipeline.run_groups(plan, run), need_dw, need_db)
    dw = None
    if need_dw:
        dw = wg.filter_transform_adjoint(du).astype(x.dtype, copy=False)
    if need_db:
        db = db.astype(x.dtype)
    return dx, dw, db

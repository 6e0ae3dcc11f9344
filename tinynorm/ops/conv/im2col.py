"""The ``im2col`` plan: any kernel, stride and padding on CPU, as im2col + one
BLAS GEMM per chunk of the batch (:func:`.pipeline.gemm_forward` with the
lowering ``col = im2col(x)``, whose adjoint is ``col2im``).

With K = C*kh*kw, P = OH*OW and col = im2col(x) of shape (K, N*P) (see
:mod:`tinynorm.ops._geometry`)::

    forward        Y  (C_out, N*P) = w2 (C_out, K) @ col (K, N*P)
    weight grad    dw (C_out, K)   = dY (C_out, N*P) @ col.T
    input grad     dcol (K, N*P)   = w2.T @ dY,  dx = col2im(dcol)

The batch is folded into the GEMM's column dimension, so each pass is a few
large GEMMs (no Python loop over pixels), chunk by chunk as the plan says.
The numba im2col / col2im kernels walk the planes channel-major (see
``_geometry``).
"""
from __future__ import annotations

import numpy as np

from .. import _geometry as geo
from . import pipeline

__all__ = ["forward", "backward"]


def _lowering(plan):
    """col (K, n*P) of a chunk of x, in the "col" workspace."""
    kernel, stride, pad = plan.kernel, plan.stride, plan.pad
    k = plan.x_shape[1] * kernel[0] * kernel[1]
    plane = plan.out_hw[0] * plan.out_hw[1]

    def lower(x, serial):
        col = pipeline.workspace("col", (k, x.shape[0] * plane), x.dtype)
        return geo.im2col(x, kernel, stride, pad, out=col, serial=serial)
    return lower


def _scatter(plan):
    kernel, stride, pad = plan.kernel, plan.stride, plan.pad

    def scatter(dcol, chunk_shape, out, serial):
        geo.col2im(dcol, chunk_shape, kernel, stride, pad, out=out, serial=serial)
    return scatter


def forward(x, w, b, plan):
    """y (N, C_out, OH, OW); x C-contiguous."""
    return pipeline.gemm_forward(x, w, b, plan, _lowering(plan))


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    """(dx, dw, db), each None when not asked for (see :func:`.pipeline.gemm_backward`)."""
    return pipeline.gemm_backward(np.ascontiguousarray(dy), x, w, plan, _lowering(plan),
                                  _scatter(plan), need_dx, need_dw, need_db)

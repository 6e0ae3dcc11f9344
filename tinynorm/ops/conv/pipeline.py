"""What the CPU algorithms share: per-thread workspaces, the layout kernels
between NCHW and the GEMM layout, the batch pipeline, and the lowered-GEMM
passes that im2col and the 1x1 convolutions are both instances of.

The batch pipeline.  A plan cuts the batch into chunks and the chunks into
one contiguous group per thread (:class:`.plan.ConvPlan`).  Each thread runs
its chunks one after the other -- lowering, GEMM, layout, scatter -- with
single-threaded kernels and BLAS, in its own workspaces, writing its slice of
the output; the threads meet once per pass.  Against one multi-threaded
kernel or GEMM per step, this saves the barriers (a few hundred per GEMM
inside OpenBLAS, one per numba kernel), each of which costs a scheduler time
slice when another process holds a core, and keeps the workspaces at one
chunk per thread (T x ``conv_chunk_bytes`` instead of 462 MB of col for
cifar10-nv conv2 at batch 128).  A one-thread plan runs its chunks on the calling thread with the
parallel kernels and the split GEMMs of :mod:`tinynorm.ops._gemm`.  The
weight gradient is summed per group, then over groups in order: the result
does not depend on timing.

The lowered GEMM.  With a lowering L that maps a chunk of x (n, C, H, W) to
col (K, n*P) -- im2col, or for a 1x1 / stride-1 / pad-0 conv the swap of N
and C -- and its adjoint L^T::

    forward        Y  (C_out, n*P) = w2 (C_out, K) @ col,   y = NCHW(Y) + b
    weight grad    dw (C_out, K)   = sum over chunks of dY (C_out, n*P) @ col.T
    input grad     dx[chunk]       = L^T(w2.T (K, C_out) @ dY)

The forward caches ``x`` (a reference), not ``col``: the backward lowers x
again into the workspace, which costs one memory-bound pass and saves
holding a col per layer between forward and backward.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange, uint64

from .. import _gemm
from .. import _kernels as kernels

__all__ = ["workspace", "release_workspaces", "to_gemm_layout", "from_gemm_layout",
           "run_groups", "gemm_forward", "gemm_backward"]


# ----------------------------------------------------------------------------
# workspaces
# ----------------------------------------------------------------------------

_tls = threading.local()
_all_pools = []      # every thread's pool, so that release_workspaces frees them all


def workspace(name, shape, dtype):
    """A C-contiguous array of ``shape`` backed by a reusable per-thread buffer.

    The buffer grows to the largest request and is never shrunk; the returned
    view is valid until the next request of the same ``name`` on this thread.
    Never hand a workspace view back to a caller.  (A fresh allocation of that
    size costs page faults on every call.)
    """
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
        _all_pools.append(pool)
    size = 1
    for s in shape:
        size *= int(s)
    key = (name, np.dtype(dtype).str)
    buf = pool.get(key)
    if buf is None or buf.size < size:
        buf = pool[key] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def release_workspaces():
    """Free the im2col / GEMM / Winograd workspaces of every thread (re-made on
    demand).  Not to be called while a convolution runs on another thread."""
    for pool in _all_pools:
        pool.clear()


# ----------------------------------------------------------------------------
# numba layout kernels: NCHW <-> (C_out, N*P)
# ----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _cnp_to_nchw_kernel(src, bias, n_batch, n_out, plane, dst):
    """dst[n, o, p] = src[o, n*P + p] + bias[o]   (flat arrays).

    Output-channel-major (n fastest), so src is read row by row (see the
    im2col kernel in ``_geometry`` for why that order)."""
    n_cols = n_batch * plane
    for on in prange(n_batch * n_out):
        o = on // n_batch
        n = on - o * n_batch
        s = uint64(o * n_cols + n * plane)
        d = uint64((n * n_out + o) * plane)
        bo = bias[o]
        for t in range(uint64(plane)):
            dst[d + t] = src[s + t] + bo


# reassoc: lets LLVM vectorise the float64 sum (a serial add chain otherwise; 3.5x
# slower for the cifar10-nv conv2 dy).  The sum is accumulated in float64.
@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _nchw_to_cnp_kernel(src, n_batch, n_chan, plane, dst, sums, want_sums):
    """dst[c, n*P + p] = src[n, c, p];  sums[c] = sum over (n, p) in float64."""
    n_cols = n_batch * plane
    for c in prange(n_chan):
        acc = 0.0
        for n in range(n_batch):
            s = uint64((n * n_chan + c) * plane)
            d = uint64(c * n_cols + n * plane)
            if want_sums:
                for t in range(uint64(plane)):
                    v = src[s + t]
                    dst[d + t] = v
                    acc += v
            else:
                for t in range(uint64(plane)):
                    dst[d + t] = src[s + t]
        if want_sums:
            sums[c] = acc


# single-threaded twins that release the GIL, for the batch pipeline
_cnp_to_nchw_serial = kernels.serial_twin(_cnp_to_nchw_kernel)
_nchw_to_cnp_serial = kernels.serial_twin(_nchw_to_cnp_kernel, fastmath={"reassoc"})


def to_gemm_layout(a, name, want_sums=False, serial=False):
    """NCHW a (N, C, OH, OW) -> (C, N*OH*OW) and, if asked, per-channel float64
    sums (C,) (else None).  The result is a workspace, or a view of ``a`` when N == 1.
    ``serial``: single-threaded kernel on the calling thread, GIL released."""
    n, c, oh, ow = a.shape
    a = np.ascontiguousarray(a)
    if n == 1:
        # (1, C, OH, OW) -> (C, OH*OW) is a reshape
        sums = a.sum(axis=(0, 2, 3), dtype=np.float64) if want_sums else None
        return a.reshape(c, oh * ow), sums
    out = workspace(name, (c, n * oh * ow), a.dtype)
    sums = np.empty(c if want_sums else 0, dtype=np.float64)
    args = (a.reshape(-1), n, c, oh * ow, out.reshape(-1), sums, want_sums)
    if serial:
        _nchw_to_cnp_serial(*args)
    else:
        kernels.launch(_nchw_to_cnp_kernel, c, a.size, *args)
    return out, (sums if want_sums else None)


def from_gemm_layout(a2, n, bias, out=None, serial=False):
    """(C, N*P) -> NCHW (N, C, P) with ``bias`` (C,) added; bias may be None.

    ``out``: a C-contiguous array of N*C*P elements to write into (else fresh);
    ``serial`` as in :func:`to_gemm_layout`."""
    c = a2.shape[0]
    plane = a2.shape[1] // n
    out = np.empty((n, c, plane), dtype=a2.dtype) if out is None else out.reshape(n, c, plane)
    bias = np.zeros(c, dtype=a2.dtype) if bias is None else np.ascontiguousarray(bias)
    args = (np.ascontiguousarray(a2).reshape(-1), bias, n, c, plane, out.reshape(-1))
    if serial:
        _cnp_to_nchw_serial(*args)
    else:
        kernels.launch(_cnp_to_nchw_kernel, n * c, out.size, *args)
    return out


# ----------------------------------------------------------------------------
# the batch pipeline
# ----------------------------------------------------------------------------

def run_groups(plan, fn):
    """fn(chunks, serial) for each of the plan's groups of chunks: on the
    calling thread with the parallel kernels when there is one group, else one
    thread per group (the serial kernels).  Returns the results in group order."""
    groups = plan.chunk_groups()
    if len(groups) == 1:
        return [fn(groups[0], False)]
    return _gemm.run_threads([lambda g=g: fn(g, True) for g in groups])


def gemm_forward(x, w, b, plan, lower):
    """y (N, C_out, OH, OW) = NCHW(w2 @ lower(x)) + b, chunk by chunk.

    ``lower(x_chunk, serial)`` returns the chunk's col (K, n_chunk*P), a
    workspace or a view of x."""
    n = x.shape[0]
    c_out = w.shape[0]
    oh, ow = plan.out_hw
    # w2: (C_out, C_in, kh, kw) -> (C_out, K), K = C_in*kh*kw, matching col's rows
    w2 = np.ascontiguousarray(w).reshape(c_out, -1)
    if n == 1:
        # (C_out, 1*P) is already NCHW: GEMM straight into the output
        col = lower(x, False)                                     # (K, P)
        y = np.empty((1, c_out, oh, ow), dtype=x.dtype)
        _gemm.matmul(w2, col, out=y.reshape(c_out, oh * ow))
        if b is not None:
            y += b.reshape(1, c_out, 1, 1)
        return y
    y = np.empty((n, c_out, oh, ow), dtype=x.dtype)

    def run(chunks, serial):
        gemm = np.matmul if serial else _gemm.matmul
        for s, e in chunks:
            col = lower(x[s:e], serial)                              # (K, n_chunk*P)
            # y2: (C_out, n_chunk*P), column index (n, oy, ox)
            y2 = workspace("gemm", (c_out, col.shape[1]), x.dtype)
            gemm(w2, col, out=y2)
            from_gemm_layout(y2, e - s, b, out=y[s:e], serial=serial)
    run_groups(plan, run)
    return y


def gemm_backward(dy, x, w, plan, lower, scatter, need_dx, need_dw, need_db):
    """(dx or None, dw or None, db or None), chunk by chunk of the batch:

        dw (C_out, K)  = sum over chunks of dY_c (C_out, n_c*P) @ col_c.T
        dx[chunk]      = scatter(w2.T (K, C_out) @ dY_c)
        db             = sum over (n, oy, ox) of dy

    ``lower`` as in :func:`gemm_forward`; ``scatter(dcol, chunk_shape, out,
    serial)`` writes the adjoint of the lowering of dcol (K, n_c*P) into
    ``out`` (n_c, C, H, W).  dy must be C-contiguous."""
    n, c, h, v = x.shape
    c_out = w.shape[0]
    w2 = np.ascontiguousarray(w).reshape(c_out, -1)
    dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None
    if not (need_dx or need_dw or need_db):
        return None, None, None

    def run(chunks, serial):
        gemm = np.matmul if serial else _gemm.matmul
        dw_sum = None                                   # (C_out, K), or (K, C_out) if serial
        db_sum = np.zeros(c_out, dtype=np.float64) if need_db else None
        for s, e in chunks:
            # dy2: (C_out, n_chunk*P)
            dy2, sums = to_gemm_layout(dy[s:e], "dy", want_sums=need_db, serial=serial)
            if need_db:
                db_sum += sums
            if need_dw:
                col = lower(x[s:e], serial)
                # (K, C_out) = col @ dY.T: OpenBLAS is faster in this orientation
                part = np.matmul(col, dy2.T) if serial else _gemm.matmul_nt_sum(dy2, col)
                if dw_sum is None:
                    dw_sum = part
                else:
                    dw_sum += part
            if need_dx:
                # the col workspace again, now for dcol (K, n_chunk*P)
                dcol = workspace("col", (w2.shape[1], dy2.shape[1]), x.dtype)
                gemm(w2.T, dy2, out=dcol)
                scatter(dcol, (e - s, c, h, v), dx[s:e], serial)
        if need_dw and serial:
            dw_sum = np.ascontiguousarray(dw_sum.T)
        return dw_sum, db_sum

    dw, db = sum_partials(run_groups(plan, run), need_dw, need_db)
    if need_dw:
        dw = dw.reshape(w.shape)
    if need_db:
        db = db.astype(x.dtype)
    return dx, dw, db


def sum_partials(results, need_first, need_second):
    """Sum the per-group (first, second) partial gradients of ``run_groups``
    (dw-like, db-like) in place into the first group's arrays; None where not needed."""
    first = second = None
    if need_first:
        first = results[0][0]
        for part, _ in results[1:]:
            first += part
    if need_second:
        second = results[0][1]
        for _, part in results[1:]:
            second += part
    return first, second

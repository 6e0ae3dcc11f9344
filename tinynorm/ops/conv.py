"""2-D convolution (cross-correlation, as in every deep-learning library).

    y[n, o, oy, ox] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, oy*sh + i, ox*sw + j]

with ``x_pad`` the input zero-padded by ``ph`` rows / ``pw`` columns on each
side, OH = (H + 2ph - kh) // sh + 1 and OW likewise.

Shapes: x (N, C, H, W), w (C_out, C, kh, kw), b (C_out,) or None,
y (N, C_out, OH, OW).  ``stride`` and ``pad`` are ints or (h, w) pairs.

How it is computed (one selector, :func:`_path`, picks the branch):

* CPU, NumPy float32/float64 -- im2col + one BLAS GEMM per batch chunk.  With
  K = C*kh*kw, P = OH*OW and col = im2col(x) of shape (K, N*P)
  (see :mod:`tinynorm.ops._geometry`)::

      forward        Y  (C_out, N*P) = w2 (C_out, K) @ col (K, N*P)
      weight grad    dw (C_out, K)   = dY (C_out, N*P) @ col.T
      input grad     dcol (K, N*P)   = w2.T @ dY,  dx = col2im(dcol)

  The batch is folded into the GEMM's column dimension, so each pass is a
  few large GEMMs (no Python loop over pixels): the batch is cut into chunks
  whose im2col buffer stays under ``COL_CHUNK_BYTES`` (32 MB; the whole
  cifar10-nv conv2 col at batch 128 would be 462 MB), one GEMM per chunk, and
  each GEMM runs as independent single-threaded BLAS calls on slices
  (:mod:`tinynorm.ops._gemm`).  Small numba kernels move between NCHW and the
  (C_out, N*P) GEMM layout, adding the bias / summing db on the way.  col, Y
  and dY live in per-thread reusable workspaces (:func:`release_workspaces`
  frees them): a fresh allocation of that size costs page faults on every call.  The forward caches ``x`` (a reference),
  not ``col``; the backward recomputes ``col`` into the workspace, which costs
  one memory-bound pass and saves holding a col per layer between forward and
  backward.
  The numba kernels run through ``_geometry.launch``, which decides between
  one thread and all of numba's threads (see its docstring: on this 2-core
  machine OpenBLAS's spinning idle threads make a second numba thread a loss
  unless ``OPENBLAS_THREAD_TIMEOUT`` is set low).
* CPU, 3x3 kernel / stride 1, at least ``WINOGRAD_MIN_CHANNELS`` (16) input
  and output channels -- Winograd, F(4x4, 3x3) by default
  (:mod:`tinynorm.ops._winograd4`; ``WINOGRAD_TILE = 2`` selects F(2x2, 3x3),
  :mod:`tinynorm.ops._winograd`): per chunk of the batch, numba transforms of
  the input tiles and S GEMMs (C_out, C) @ (C, tiles) (S = 36, or 16) in
  place of one (C_out, 9C) @ (9C, N*P), i.e. 4x (2.25x) fewer multiply-adds;
  the backward passes are the exact transposes of the same maps.  Measured
  on one core at batch 128, forward + backward: cifar10-nv conv2 714 ms with
  F(2x2) against 1276 ms with im2col; ResNet-50's 3x3 convs 0.74-0.96x of
  their F(2x2) time with F(4x4) (``experiments/bench_conv_vs_torch.py``).
  Both round differently from im2col: F(2x2) within a few float32 ulps of the
  result's scale, F(4x4) within 1e-5 of it (its transforms multiply by up to
  8; tested); ``WINOGRAD = False`` switches Winograd off.
* CPU, 1x1 kernel / stride 1 / pad 0 -- no im2col: col is x with N and C
  swapped (a plain transpose, or a view when N == 1).  When the per-sample
  matrices are wide enough or one channel count is small
  (:func:`_use_stacked`), forward and input gradient skip even that:
  ``y[n] = w2 @ x[n]`` as one stacked ``numpy.matmul`` that writes NCHW
  directly (and ``dx[n] = w2.T @ dy[n]``) -- N GEMMs inside one NumPy call.
  The weight gradient always uses the single-GEMM form.
* GPU (CuPy arrays) -- cuDNN through ``cupyx.cudnn`` when it imports, else the
  array-generic im2col (``_geometry.im2col_reference``) + ``cupy.matmul``.
  NEVER RUN ON A GPU: written against CuPy 13's documented ``cupyx.cudnn``
  signatures on a machine without one.  The generic branch is exercised on
  NumPy by the tests.

``conv2d_reference_forward`` / ``conv2d_reference_backward`` are the slow,
obviously correct direct convolution (a loop over the kh*kw kernel offsets of
tensor contractions) that the tests hold the fast paths equal to.
"""
from __future__ import annotations

import importlib
import threading

import numpy as np
from numba import njit, prange, uint64

from .. import backend
from . import _gemm
from . import _geometry as geo
from . import _winograd as _wg
from . import _winograd4 as _wg4
from ._checks import check_bias_and_backend

__all__ = [
    "conv2d_forward", "conv2d_backward", "conv2d_backward_data", "conv2d_backward_filter",
    "conv2d_reference_forward", "conv2d_reference_backward", "release_workspaces",
    "gradcheck_cases",
]

_OP = "conv2d"


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------

def _check_args(x, w, b, stride, pad, op=_OP):
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
    if w.dtype != x.dtype:
        raise ValueError(f"{op}: dtype mismatch: x is {x.dtype} but w is {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: channel mismatch: x has C={x.shape[1]} channels "
                         f"(shape {tuple(x.shape)}) but w expects C_in={w.shape[1]} "
                         f"(shape {tuple(w.shape)})")
    if min(x.shape) == 0 or min(w.shape) == 0:
        raise ValueError(f"{op}: empty array: x shape {tuple(x.shape)}, w shape "
                         f"{tuple(w.shape)}")
    xp = check_bias_and_backend(op, x, w, b, "output channel")
    stride = geo.pair(stride, "stride", op, minimum=1)
    pad = geo.pair(pad, "pad", op, minimum=0)
    kernel = (int(w.shape[2]), int(w.shape[3]))
    out_hw = geo.window_geometry(op, x.shape, kernel, stride, pad)
    return xp, kernel, stride, pad, out_hw


# ----------------------------------------------------------------------------
# workspaces
# ----------------------------------------------------------------------------

_tls = threading.local()
_all_pools = []      # every thread's pool, so that release_workspaces frees them all


def _workspace(name, shape, dtype):
    """A C-contiguous array of ``shape`` backed by a reusable per-thread buffer.

    The buffer grows to the largest request and is never shrunk; the returned
    view is valid until the next request of the same ``name`` on this thread.
    Never hand a workspace view back to a caller.
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
    """Free the im2col / GEMM workspaces of every thread (re-made on demand).

    Not to be called while a convolution runs on another thread."""
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
_cnp_to_nchw_serial = njit(nogil=True, cache=True)(_cnp_to_nchw_kernel.py_func)
_nchw_to_cnp_serial = njit(nogil=True, cache=True, fastmath={"reassoc"})(
    _nchw_to_cnp_kernel.py_func)


def _to_gemm_layout(a, name, want_sums=False, serial=False):
    """NCHW a (N, C, OH, OW) -> (C, N*OH*OW) and, if asked, per-channel float64
    sums (C,) (else None).  The result is a workspace, or a view of ``a`` when N == 1.
    ``serial``: single-threaded kernel on the calling thread, GIL released."""
    n, c, oh, ow = a.shape
    a = np.ascontiguousarray(a)
    if n == 1:
        # (1, C, OH, OW) -> (C, OH*OW) is a reshape
        sums = a.sum(axis=(0, 2, 3), dtype=np.float64) if want_sums else None
        return a.reshape(c, oh * ow), sums
    out = _workspace(name, (c, n * oh * ow), a.dtype)
    sums = np.empty(c if want_sums else 0, dtype=np.float64)
    args = (a.reshape(-1), n, c, oh * ow, out.reshape(-1), sums, want_sums)
    if serial:
        _nchw_to_cnp_serial(*args)
    else:
        geo.launch(_nchw_to_cnp_kernel, c, a.size, *args)
    return out, (sums if want_sums else None)


def _from_gemm_layout(a2, n, bias, out=None, serial=False):
    """(C, N*P) -> NCHW (N, C, P) with ``bias`` (C,) added; bias may be None.

    ``out``: a C-contiguous array of N*C*P elements to write into (else fresh);
    ``serial`` as in :func:`_to_gemm_layout`."""
    c = a2.shape[0]
    plane = a2.shape[1] // n
    out = np.empty((n, c, plane), dtype=a2.dtype) if out is None else out.reshape(n, c, plane)
    bias = np.zeros(c, dtype=a2.dtype) if bias is None else np.ascontiguousarray(bias)
    args = (np.ascontiguousarray(a2).reshape(-1), bias, n, c, plane, out.reshape(-1))
    if serial:
        _cnp_to_nchw_serial(*args)
    else:
        geo.launch(_cnp_to_nchw_kernel, n * c, out.size, *args)
    return out


# ----------------------------------------------------------------------------
# path selection
# ----------------------------------------------------------------------------

_cudnn_module = None
_cudnn_checked = False


def _cudnn():
    """``cupyx.cudnn`` if it imports (CuPy 13.x with the cuDNN library), else None."""
    global _cudnn_module, _cudnn_checked
    if not _cudnn_checked:
        _cudnn_checked = True
        if backend.cupy is not None:
            try:
                _cudnn_module = importlib.import_module("cupyx.cudnn")
            except Exception:  # ImportError, or libcudnn failing to load
                _cudnn_module = None
    return _cudnn_module


def _is_pointwise(kernel, stride, pad):
    return kernel == (1, 1) and stride == (1, 1) and pad == (0, 0)


def _use_stacked(c_in, c_out, plane):
    """1x1 convs: per-sample products (one stacked ``numpy.matmul``) instead of
    transposes + one GEMM, unless the per-sample matrices are too narrow
    (P < 64) for an efficient GEMM while both channel counts are large.
    Measured (2 cores, batch 128): cifar10-nv conv9 (320 -> 10, 5x5) forward
    0.33 ms stacked vs 3.9 ms single-GEMM; conv8 (320 -> 320, 5x5) 5.4 ms vs
    4.2 ms; ResNet 64 -> 256 at 56x56 (batch 32) 25 ms vs 44 ms."""
    return plane >= 64 or min(c_in, c_out) <= 32


def _path(xp, x):
    """'cpu' (numba + BLAS), 'cudnn', or 'generic' (array-generic im2col + matmul)."""
    if xp is np:
        return "cpu" if x.dtype in geo.FAST_DTYPES else "generic"
    return "cudnn" if _cudnn() is not None else "generic"


# ----------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------

def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """Convolution forward pass.

    Parameters
    ----------
    x : (N, C, H, W) float32 or float64, NumPy or CuPy
    w : (C_out, C, kh, kw), same dtype and backend as x
    b : (C_out,) or None
    stride, pad : int or (h, w) pair; stride >= 1, pad >= 0

    Returns
    -------
    y : (N, C_out, OH, OW), C-contiguous, OH = (H + 2*ph - kh) // sh + 1
    cache : for :func:`conv2d_backward`
    """
    xp, kernel, stride, pad, (oh, ow) = _check_args(x, w, b, stride, pad)
    path = _path(xp, x)
    x = xp.ascontiguousarray(x)     # cached for the backward, which wants it contiguous
    if path == "cpu":
        y = _forward_cpu(x, w, b, kernel, stride, pad, oh, ow)
    elif path == "cudnn":
        y = _forward_cudnn(xp, x, w, b, stride, pad, oh, ow)
    else:
        y = _forward_generic(xp, x, w, b, kernel, stride, pad, oh, ow)
    cache = (x, w, b is not None, kernel, stride, pad, path)
    return y, cache


def conv2d_backward(dy, cache):
    """Convolution backward pass: ``(dx, dw, db)``; ``db`` is None without bias.

    With col = im2col(x) (K, N*P), K = C*kh*kw, P = OH*OW, and dY = dy laid
    out as (C_out, N*P)::

        dw  = dY @ col.T                      reshaped to (C_out, C, kh, kw)
        dx  = col2im(w2.T @ dY)               w2 = w reshaped to (C_out, K)
        db  = sum_{n, oy, ox} dy[n, :, oy, ox]

    i.e. dx[n, c, h, v] = sum_{o, i, j} w[o, c, i, j] * dy[n, o, oy, ox] over the
    (oy, ox) whose window covers input pixel (h, v) at offset (i, j).

    dy : (N, C_out, OH, OW); returns dx (N, C, H, W), dw like w, db (C_out,) or None.
    """
    x, w, has_bias, kernel, stride, pad, path = cache
    _check_dy(dy, x, w, kernel, stride, pad)
    if path == "cpu":
        return _backward_cpu(dy, x, w, has_bias, kernel, stride, pad, need_dx=True,
                             need_dw=True)
    if path == "cudnn":
        return _backward_cudnn(dy, x, w, has_bias, stride, pad)
    return _backward_generic(dy, x, w, has_bias, kernel, stride, pad)


def conv2d_backward_data(dy, cache):
    """Only the input gradient ``dx = col2im(w2.T @ dY)`` (see :func:`conv2d_backward`).

    For callers that need no weight gradient; also timed on its own by
    ``experiments/bench_ops.py``.  dy (N, C_out, OH, OW) -> dx (N, C, H, W).
    """
    x, w, has_bias, kernel, stride, pad, path = cache
    _check_dy(dy, x, w, kernel, stride, pad)
    if path == "cpu":
        return _backward_cpu(dy, x, w, False, kernel, stride, pad, need_dx=True,
                             need_dw=False)[0]
    if path == "cudnn":
        return _backward_cudnn(dy, x, w, has_bias, stride, pad, need=("dx",))[0]
    return _backward_generic(dy, x, w, has_bias, kernel, stride, pad)[0]


def conv2d_backward_filter(dy, cache):
    """Only the parameter gradients ``(dw, db)`` with ``dw = dY @ col.T`` and
    ``db = sum_{n,oy,ox} dy`` (see :func:`conv2d_backward`); db is None without bias.

    For a first layer, whose input needs no gradient.  dy (N, C_out, OH, OW).
    """
    x, w, has_bias, kernel, stride, pad, path = cache
    _check_dy(dy, x, w, kernel, stride, pad)
    if path == "cpu":
        return _backward_cpu(dy, x, w, has_bias, kernel, stride, pad, need_dx=False,
                             need_dw=True)[1:]
    if path == "cudnn":
        return _backward_cudnn(dy, x, w, has_bias, stride, pad, need=("dw",))[1:]
    return _backward_generic(dy, x, w, has_bias, kernel, stride, pad)[1:]


def _check_dy(dy, x, w, kernel, stride, pad):
    oh, ow = geo.window_geometry(_OP, x.shape, kernel, stride, pad)
    expected = (x.shape[0], w.shape[0], oh, ow)
    if tuple(dy.shape) != expected:
        raise ValueError(f"{_OP}_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{expected} (the forward output's shape)")
    if dy.dtype != x.dtype:
        raise ValueError(f"{_OP}_backward: dtype mismatch: dy is {dy.dtype} but the "
                         f"forward ran in {x.dtype}")


# ----------------------------------------------------------------------------
# CPU: numba im2col + one BLAS GEMM per pass
# ----------------------------------------------------------------------------

def _col_cpu(x, kernel, stride, pad, serial=False):
    """col (K, N*P) of x in a workspace (or a view of x for 1x1 with N == 1)."""
    if _is_pointwise(kernel, stride, pad):
        # 1x1 / stride 1 / pad 0: col is x with N and C swapped, (C, N*H*W)
        return _to_gemm_layout(x, "col", serial=serial)[0]
    n, c, h, v = x.shape
    oh = geo.conv_outsize(h, kernel[0], stride[0], pad[0])
    ow = geo.conv_outsize(v, kernel[1], stride[1], pad[1])
    return geo.im2col(x, kernel, stride, pad, serial=serial,
                      out=_workspace("col", (c * kernel[0] * kernel[1], n * oh * ow), x.dtype))


# The batch pipeline.  The batch is cut into chunks of samples whose im2col
# buffer stays under COL_CHUNK_BYTES, and the chunks into one contiguous group
# per thread (T = OpenBLAS's thread count).  Each thread runs its chunks one
# after the other -- im2col, GEMM, layout, col2im -- with single-threaded
# kernels and BLAS, in its own workspaces, writing its slice of the output;
# the threads meet once per pass.  Against one T-threaded kernel or GEMM per
# step, this saves the barriers (a few hundred per GEMM inside OpenBLAS, one
# per numba kernel), each of which costs a scheduler time slice when another
# process holds a core, and keeps the workspaces at T chunks (T x 32 MB
# instead of 462 MB of col for cifar10-nv conv2 at batch 128).  Small convs
# (or T = 1, or N < T) run the chunks on the calling thread with the parallel
# kernels and the split GEMMs of ``_gemm``.  The weight gradient is summed per
# group, then over groups in order: the result does not depend on timing.
COL_CHUNK_BYTES = 32 << 20


# The Winograd transform buffers (V and M, two per thread) get a smaller cap:
# measured on cifar10-nv at batch 128, 32 MB -> 16 MB took the peak memory
# of a training step from 727 to 667 MB for 1% of its time (8 MB: 641 MB, 6%).
WINOGRAD_CHUNK_BYTES = 16 << 20


def _batch_chunks(n, bytes_per_sample, min_count=1, cap=None):
    """[(start, stop), ...] covering range(n), each under ``cap`` bytes
    (default COL_CHUNK_BYTES) if it can, at least ``min_count`` of them (a
    multiple of it) when n allows."""
    cap = COL_CHUNK_BYTES if cap is None else cap
    per = max(1, min(n, cap // max(1, bytes_per_sample)))
    count = -(-n // per)
    count = min(n, -(-count // min_count) * min_count)
    bounds = [i * n // count for i in range(count + 1)]      # sizes differ by at most 1
    return list(zip(bounds[:-1], bounds[1:]))


def _chunk_bytes(x, w, oh, ow):
    """Bytes per sample that a chunk's workspaces are sized by: the larger of
    the im2col buffer (K = C*kh*kw rows of OH*OW columns) and the GEMM-output
    and dY buffers together (C_out rows each).  Counting only im2col let a
    layer with few input channels take whole-group chunks: cifar10-nv conv1
    (K = 27, C_out = 128) held two 26 MB output-side buffers per thread;
    with both counted the step's peak memory went from ~670 to 610 MB, at
    no measurable cost in time."""
    k = x.shape[1] * w.shape[2] * w.shape[3]
    return max(k, 2 * w.shape[0]) * oh * ow * x.itemsize


def _chunk_groups(x, w, oh, ow, bytes_per_sample=None, cap=None):
    """The chunks of the batch, grouped per thread: [[(start, stop), ...], ...].
    Chunks hold at most ``cap`` (default COL_CHUNK_BYTES) of ``bytes_per_sample``
    (default: :func:`_chunk_bytes`)."""
    n = x.shape[0]
    flops = n * oh * ow * w.size
    if bytes_per_sample is None:
        bytes_per_sample = _chunk_bytes(x, w, oh, ow)
    threads = _gemm.threads_for(x, w, flops=flops)
    if threads == 1 or n < threads:
        return [_batch_chunks(n, bytes_per_sample, cap=cap)]
    chunks = _batch_chunks(n, bytes_per_sample, min_count=threads, cap=cap)
    m = len(chunks)                       # a multiple of threads unless capped at n
    return [chunks[t * m // threads:(t + 1) * m // threads] for t in range(threads)]


def _run_groups(groups, fn):
    """fn(chunks, serial) for each group: on the calling thread with the parallel
    kernels when there is one group, else one thread per group."""
    if len(groups) == 1:
        return [fn(groups[0], False)]
    return _gemm.run_threads([lambda g=g: fn(g, True) for g in groups])


def _forward_cpu(x, w, b, kernel, stride, pad, oh, ow):
    if _use_winograd(x, w, kernel, stride):
        return _forward_winograd(x, w, b, pad, oh, ow)
    n = x.shape[0]
    c_out = w.shape[0]
    # w2: (C_out, C_in, kh, kw) -> (C_out, K), K = C_in*kh*kw, matching col's rows
    w2 = np.ascontiguousarray(w).reshape(c_out, -1)
    if _is_pointwise(kernel, stride, pad) and _use_stacked(x.shape[1], c_out, oh * ow):
        # x3: (N, C, P); (C_out, C) @ (N, C, P) -> (N, C_out, P), NCHW as is
        y = _gemm.matmul(w2, x.reshape(n, x.shape[1], oh * ow))
        if b is not None:
            y += b.reshape(1, c_out, 1)
        return y.reshape(n, c_out, oh, ow)
    if n == 1:
        # (C_out, 1*P) is already NCHW: GEMM straight into the output
        col = _col_cpu(x, kernel, stride, pad)                    # (K, P)
        y = np.empty((1, c_out, oh, ow), dtype=x.dtype)
        _gemm.matmul(w2, col, out=y.reshape(c_out, oh * ow))
        if b is not None:
            y += b.reshape(1, c_out, 1, 1)
        return y
    y = np.empty((n, c_out, oh, ow), dtype=x.dtype)

    def run(chunks, serial):
        gemm = np.matmul if serial else _gemm.matmul
        for s, e in chunks:
            col = _col_cpu(x[s:e], kernel, stride, pad, serial)      # (K, n_chunk*P)
            # y2: (C_out, n_chunk*P), column index (n, oy, ox)
            y2 = _workspace("gemm", (c_out, col.shape[1]), x.dtype)
            gemm(w2, col, out=y2)
            _from_gemm_layout(y2, e - s, b, out=y[s:e], serial=serial)
    _run_groups(_chunk_groups(x, w, oh, ow), run)
    return y


def _backward_cpu(dy, x, w, has_bias, kernel, stride, pad, need_dx, need_dw):
    """(dx or None, dw or None, db or None), chunk by chunk of the batch:

        dw (C_out, K)  = sum over chunks of dY_c (C_out, n_c*P) @ col_c.T
        dx[chunk]      = col2im(w2.T (K, C_out) @ dY_c)
    """
    dy = np.ascontiguousarray(dy)
    if _use_winograd(x, w, kernel, stride):
        return _backward_winograd(dy, x, w, has_bias, pad, need_dx, need_dw)
    n, c, h, v = x.shape
    c_out = w.shape[0]
    oh, ow = dy.shape[2], dy.shape[3]
    w2 = np.ascontiguousarray(w).reshape(c_out, -1)
    pointwise = _is_pointwise(kernel, stride, pad)
    stacked = pointwise and _use_stacked(c, c_out, oh * ow)
    dx = None
    if need_dx and stacked:
        # dy3: (N, C_out, P); (C, C_out) @ (N, C_out, P) -> (N, C, P), NCHW as is
        dx = _gemm.matmul(w2.T, dy.reshape(n, c_out, oh * ow)).reshape(n, c, h, v)
        if not (need_dw or has_bias):
            return dx, None, None
    elif need_dx:
        dx = np.empty(x.shape, dtype=x.dtype)

    def run(chunks, serial):
        gemm = np.matmul if serial else _gemm.matmul
        dw_sum = None                                   # (C_out, K), or (K, C_out) if serial
        db_sum = np.zeros(c_out, dtype=np.float64) if has_bias else None
        for s, e in chunks:
            # dy2: (C_out, n_chunk*P)
            dy2, sums = _to_gemm_layout(dy[s:e], "dy", want_sums=has_bias, serial=serial)
            if has_bias:
                db_sum += sums
            if need_dw:
                col = _col_cpu(x[s:e], kernel, stride, pad, serial)
                # (K, C_out) = col @ dY.T: OpenBLAS is faster in this orientation
                part = np.matmul(col, dy2.T) if serial else _gemm.matmul_nt_sum(dy2, col)
                if dw_sum is None:
                    dw_sum = part
                else:
                    dw_sum += part
            if need_dx and not stacked:
                # the col workspace again, now for dcol (K, n_chunk*P)
                dcol = _workspace("col", (w2.shape[1], dy2.shape[1]), x.dtype)
                gemm(w2.T, dy2, out=dcol)
                if pointwise:
                    # col2im of a 1x1 / stride-1 / pad-0 conv is the (C, N*P) -> NCHW transpose
                    _from_gemm_layout(dcol, e - s, None, out=dx[s:e], serial=serial)
                else:
                    geo.col2im(dcol, (e - s, c, h, v), kernel, stride, pad, out=dx[s:e],
                               serial=serial)
        if need_dw and serial:
            dw_sum = np.ascontiguousarray(dw_sum.T)
        return dw_sum, db_sum

    results = _run_groups(_chunk_groups(x, w, oh, ow), run)
    dw = db = None
    if need_dw:
        dw = results[0][0]
        for part, _ in results[1:]:
            dw += part
        dw = dw.reshape(w.shape)
    if has_bias:
        db = results[0][1]
        for _, part in results[1:]:
            db += part
        db = db.astype(x.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------
# CPU: Winograd F(2x2, 3x3) for 3x3 / stride-1 convs (see _winograd.py)
# ----------------------------------------------------------------------------

# The path is on when True and the conv is 3x3 / stride 1 with at least this
# many input and output channels (below it the 16 GEMMs are too thin; conv1 of
# cifar10-nv, 3 -> 128, stays on im2col).
WINOGRAD = True
WINOGRAD_MIN_CHANNELS = 16
# 4: F(4x4, 3x3) (_winograd4, 36 GEMMs, 4x fewer multiply-adds than direct);
# 2: F(2x2, 3x3) (_winograd, 16 GEMMs, 2.25x fewer, within a few ulps of im2col)
WINOGRAD_TILE = 4


def _use_winograd(x, w, kernel, stride):
    return (WINOGRAD and kernel == (3, 3) and stride == (1, 1)
            and min(x.shape[1], w.shape[0]) >= WINOGRAD_MIN_CHANNELS)


def _winograd_module():
    """The F(m x m, 3x3) implementation ``WINOGRAD_TILE`` selects."""
    if WINOGRAD_TILE == 4:
        return _wg4
    if WINOGRAD_TILE == 2:
        return _wg
    raise ValueError(f"conv.WINOGRAD_TILE must be 2 or 4, got {WINOGRAD_TILE!r}")


def _tbuf(wg, name, rows, cols, dtype):
    """A (S, rows, cols) transform-domain workspace of ``wg`` (S = 16 or 36;
    see ``_winograd.transform_buffer``)."""
    itemsize = np.dtype(dtype).itemsize
    return wg.transform_buffer(_workspace(name, (wg.buffer_size(rows, cols, itemsize),),
                                          dtype), rows, cols)


def _winograd_bytes(wg, x, w, oh, ow):
    """Bytes per sample of the transform-domain buffers (V or M, the larger)."""
    th, tw = wg.tiles(oh, ow)
    return wg.SLICES * max(x.shape[1], w.shape[0]) * th * tw * x.itemsize


def _forward_winograd(x, w, b, pad, oh, ow):
    """y = A^T [U (x) V] A per tile, chunk by chunk of the batch: S GEMMs
    (C_out, C) @ (C, tiles) per chunk as one stacked ``numpy.matmul``."""
    wg = _winograd_module()
    n, c = x.shape[:2]
    c_out = w.shape[0]
    th, tw = wg.tiles(oh, ow)
    u = wg.filter_transform(np.ascontiguousarray(w))          # (S, C_out, C)
    y = np.empty((n, c_out, oh, ow), dtype=x.dtype)

    def run(chunks, serial):
        for s, e in chunks:
            v = wg.input_transform(x[s:e], pad, _tbuf(wg, "wg_v", c, (e - s) * th * tw,
                                                      x.dtype), serial)
            m = _tbuf(wg, "wg_m", c_out, v.shape[2], x.dtype)
            np.matmul(u, v, out=m)
            wg.output_transform(m, e - s, oh, ow, b, y[s:e], serial)
    _run_groups(
        _chunk_groups(x, w, oh, ow, _winograd_bytes(wg, x, w, oh, ow), WINOGRAD_CHUNK_BYTES), run)
    return y


def _backward_winograd(dy, x, w, has_bias, pad, need_dx, need_dw):
    """(dx, dw, db) as transposes of the forward's maps, chunk by chunk:
    dM = A dY A^T;  dU += dM @ V^T (S GEMMs);  dV = U^T @ dM;  dx = B dV B^T
    scattered;  dw = G^T dU G."""
    wg = _winograd_module()
    n, c, h, v_ = x.shape
    c_out = w.shape[0]
    oh, ow = dy.shape[2], dy.shape[3]
    th, tw = wg.tiles(oh, ow)
    u_t = wg.filter_transform(np.ascontiguousarray(w)).transpose(0, 2, 1) if need_dx else None
    dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None

    def run(chunks, serial):
        du_sum = None
        db_sum = np.zeros(c_out, dtype=np.float64)
        for s, e in chunks:
            t = (e - s) * th * tw
            dm, sums = wg.output_transform_adjoint(dy[s:e], _tbuf(wg, "wg_m", c_out, t, x.dtype),
                                                   serial)
            db_sum += sums
            if need_dw:
                v = wg.input_transform(x[s:e], pad, _tbuf(wg, "wg_v", c, t, x.dtype), serial)
                part = np.matmul(dm, v.transpose(0, 2, 1))       # (S, C_out, C)
                if du_sum is None:
                    du_sum = part
                else:
                    du_sum += part
            if need_dx:
                dv = _tbuf(wg, "wg_v", c, t, x.dtype)
                np.matmul(u_t, dm, out=dv)
                wg.input_transform_adjoint(dv, (e - s, c, h, v_), pad, dx[s:e], serial)
        return du_sum, db_sum

    results = _run_groups(
        _chunk_groups(x, w, oh, ow, _winograd_bytes(wg, x, w, oh, ow), WINOGRAD_CHUNK_BYTES), run)
    dw = db = None
    if need_dw:
        du = results[0][0]
        for part, _ in results[1:]:
            du += part
        dw = wg.filter_transform_adjoint(du).astype(x.dtype, copy=False)
    if has_bias:
        db = results[0][1]
        for _, part in results[1:]:
            db += part
        db = db.astype(x.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------
# array-generic: im2col + matmul (the GPU fallback; runs on NumPy in the tests)
# ----------------------------------------------------------------------------

def _forward_generic(xp, x, w, b, kernel, stride, pad, oh, ow):
    n = x.shape[0]
    c_out = w.shape[0]
    col = geo.im2col_reference(x, kernel, stride, pad)           # (K, N*P)
    y2 = xp.matmul(w.reshape(c_out, -1), col)                    # (C_out, N*P)
    # (C_out, N, OH, OW) -> (N, C_out, OH, OW)
    y = xp.ascontiguousarray(y2.reshape(c_out, n, oh, ow).transpose(1, 0, 2, 3))
    if b is not None:
        y += b.reshape(1, c_out, 1, 1)
    return y


def _backward_generic(dy, x, w, has_bias, kernel, stride, pad):
    xp = backend.get_array_module(dy)
    c_out = w.shape[0]
    # dy: (N, C_out, OH, OW) -> (C_out, N, OH, OW) -> dY (C_out, N*P)
    dy2 = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(c_out, -1)
    col = geo.im2col_reference(x, kernel, stride, pad)           # (K, N*P)
    dw = xp.matmul(dy2, col.T).reshape(w.shape)
    dcol = xp.matmul(w.reshape(c_out, -1).T, dy2)                # (K, N*P)
    dx = geo.col2im_reference(dcol, x.shape, kernel, stride, pad)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# GPU: cuDNN (NEVER RUN ON A GPU -- written against CuPy 13's cupyx.cudnn API:
#   convolution_forward(x, W, b, y, pad, stride, dilation, groups, *, auto_tune,
#                       tensor_core)
#   convolution_backward_data(W, gy, b, gx, pad, stride, dilation, groups, *,
#                             deterministic, auto_tune, tensor_core)
#   convolution_backward_filter(x, gy, gW, pad, stride, dilation, groups, *,
#                               deterministic, auto_tune, tensor_core)
# each writes into its preallocated output argument)
# ----------------------------------------------------------------------------

# "auto" lets CuPy decide on tensor cores (it enables them for float16 only);
# float64 gradient checks must not lose precision, so they say "never".
def _tensor_core(dtype):
    return "never" if dtype == np.float64 else "auto"


def _forward_cudnn(xp, x, w, b, stride, pad, oh, ow):
    cudnn = _cudnn()
    y = xp.empty((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    cudnn.convolution_forward(x, xp.ascontiguousarray(w), b, y, pad, stride, (1, 1), 1,
                              auto_tune=False, tensor_core=_tensor_core(x.dtype))
    return y


def _backward_cudnn(dy, x, w, has_bias, stride, pad, need=("dx", "dw")):
    cudnn = _cudnn()
    xp = backend.get_array_module(dy)
    dy = xp.ascontiguousarray(dy)
    dx = dw = None
    if "dx" in need:
        dx = xp.empty(x.shape, dtype=x.dtype)
        cudnn.convolution_backward_data(xp.ascontiguousarray(w), dy, None, dx, pad, stride,
                                        (1, 1), 1, deterministic=False, auto_tune=False,
                                        tensor_core=_tensor_core(x.dtype))
    if "dw" in need:
        dw = xp.empty(w.shape, dtype=w.dtype)
        cudnn.convolution_backward_filter(x, dy, dw, pad, stride, (1, 1), 1,
                                          deterministic=False, auto_tune=False,
                                          tensor_core=_tensor_core(x.dtype))
    db = dy.sum(axis=(0, 2, 3)) if (has_bias and "dw" in need) else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# slow reference (tests only)
# ----------------------------------------------------------------------------

def conv2d_reference_forward(x, w, b=None, stride=1, pad=0):
    """Direct convolution, one tensor contraction per kernel offset (slow; tests).

    y[n, o] = b[o] + sum_{i, j} sum_c w[o, c, i, j] * x_pad[n, c, i::sh, j::sw]
    (window of OH x OW).  Same arguments, shapes and cache contract as
    :func:`conv2d_forward`.
    """
    xp, (kh, kw), (sh, sw), (ph, pw), (oh, ow) = _check_args(x, w, b, stride, pad)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = xp.zeros((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x_pad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            y += xp.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y, (x, w, b is not None, (kh, kw), (sh, sw), (ph, pw))


def conv2d_reference_backward(dy, cache):
    """Direct backward, one contraction per kernel offset (slow; tests).

    For each offset (i, j), with patch = x_pad[:, :, i::sh, j::sw] (OH x OW)::

        dw[:, :, i, j]            = sum_{n,oy,ox} dy[n, o] * patch[n, c]
        dx_pad[:, :, i::sh, j::sw] += sum_o dy[n, o] * w[o, c, i, j]
        db                        = sum_{n,oy,ox} dy
    """
    x, w, has_bias, (kh, kw), (sh, sw), (ph, pw) = cache
    xp = backend.get_array_module(x)
    n, c, h, v = x.shape
    oh, ow = dy.shape[2:]
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dx_pad = xp.zeros_like(x_pad)
    dw = xp.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                      slice(j, j + sw * (ow - 1) + 1, sw))
            dw[:, :, i, j] = xp.einsum("nohw,nchw->oc", dy, x_pad[window])
            dx_pad[window] += xp.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    dx = xp.ascontiguousarray(dx_pad[:, :, ph:ph + h, pw:pw + v])
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# `tinynorm gradcheck`
# ----------------------------------------------------------------------------

def gradcheck_cases():
    """Small float64 cases: kernels 1/3/5 and 2x3, strides 1/2/(2,1), pads 0/1/2,
    and a 3x3 / stride-1 conv with 16 channels (Winograd)."""
    rng = np.random.default_rng(0)
    configs = [
        # (N, C, H, W), C_out, (kh, kw), stride, pad, bias
        ((2, 3, 5, 6), 4, (3, 3), 1, 1, True),
        ((1, 2, 7, 5), 3, (3, 3), 2, 0, True),
        ((2, 2, 6, 7), 3, (5, 5), 1, 2, False),
        ((2, 3, 4, 5), 2, (1, 1), 1, 0, True),
        ((1, 2, 7, 6), 3, (2, 3), (2, 1), (1, 2), True),
        ((2, 16, 5, 4), 16, (3, 3), 1, 1, True),        # the Winograd path
    ]
    cases = []
    for shape, c_out, (kh, kw), stride, pad, bias in configs:
        x = rng.standard_normal(shape)
        w = rng.standard_normal((c_out, shape[1], kh, kw)) / np.sqrt(shape[1] * kh * kw)
        b = rng.standard_normal(c_out) if bias else None
        label = f"conv2d {kh}x{kw} s{stride} p{pad}"
        cases.append((label, conv2d_forward, conv2d_backward, (x, w, b, stride, pad),
                      ("x", "w", "b", "stride", "pad")))
    return cases

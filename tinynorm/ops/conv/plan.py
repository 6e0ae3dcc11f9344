"""The convolution plan: which algorithm runs, over which chunks of the batch,
on how many threads -- chosen once, from shapes, dtype, backend and the
settings of :mod:`tinynorm.settings`, and recorded in the forward's cache so
that the backward does what the forward did.

The algorithms (first match wins):

=============  =============================================================
``cudnn``      CuPy arrays, ``use_cudnn`` on, ``force_generic`` off, the cuDNN
               frontend usable with cuDNN 9 and this geometry supported by it
               (:mod:`.cudnn`)
``generic``    CuPy arrays otherwise (``reason`` says why); NumPy arrays with
               ``use_numba`` off or ``force_generic`` on: array-generic
               im2col + matmul (:mod:`.generic`)
``onednn``     float32 NumPy arrays with ``use_onednn`` on and oneDNN's
               library loaded: oneDNN's convolution primitives (:mod:`.onednn`)
``winograd4``  3x3 kernel, stride 1, at least ``winograd_min_channels`` input
``winograd2``  and output channels, ``winograd`` on: Winograd F(4x4, 3x3)
               or F(2x2, 3x3) (:mod:`.winograd`), by ``winograd_tile``: 4, 2,
               or ``"auto"`` (the default): F(2x2) where 2x2 tiles cover the
               output with less padding than 4x4 tiles (e.g. 14x14: 16x16
               under 4x4 tiles) and neither channel count exceeds
               ``winograd2_max_channels``, else F(4x4)
``pointwise``  1x1 kernel, stride 1, pad 0: GEMMs on the NCHW data itself,
               per sample (``stacked``) or over N and C swapped
               (:mod:`.pointwise`)
``im2col``     everything else: im2col + one GEMM per chunk (:mod:`.im2col`)
=============  =============================================================

Chunks and threads (CPU algorithms).  The batch is cut into ``n_chunks``
consecutive chunks whose workspaces stay under ``conv_chunk_bytes``
(``winograd_chunk_bytes`` for the Winograd transform buffers), and the
chunks into ``threads`` contiguous groups, one per pipeline thread
(:mod:`.pipeline`).  ``threads`` is the ``conv_threads`` setting, or by
default OpenBLAS's thread count for a convolution of at least
``conv_split_min_flops`` multiply-adds and 1 below it; with one thread the chunks
run on the calling thread with the parallel kernels and split GEMMs.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...settings import Settings, numba_enabled
from ...settings import current as current_settings
from .. import _gemm
from .. import _geometry as geo
from .. import _kernels as kernels
from . import _winograd2, _winograd4, cudnn, onednn

__all__ = ["ConvPlan", "conv_plan", "ALGORITHMS", "geometry"]

ALGORITHMS = ("onednn", "winograd4", "winograd2", "pointwise", "im2col", "cudnn", "generic")

# the F(m x m, 3x3) kernel module of each Winograd algorithm
WINOGRAD_KERNELS = {"winograd4": _winograd4, "winograd2": _winograd2}


@dataclasses.dataclass(frozen=True, repr=False)
class ConvPlan:
    """How one convolution (forward and backward) is computed.

    algorithm   one of :data:`ALGORITHMS` (see the module docstring)
    x_shape     (N, C, H, W);  w_shape (C_out, C, kh, kw)
    stride, pad (h, w) pairs;  out_hw (OH, OW)
    dtype       the arrays' dtype
    stacked     ``pointwise`` only: the forward and input gradient as one stacked
                per-sample matmul straight on NCHW
    n_chunks    consecutive chunks the batch is cut into (sizes differ by <= 1)
    threads     pipeline threads, each running a contiguous group of chunks
                (1: the calling thread, with parallel kernels and split GEMMs)
    settings    the :class:`tinynorm.settings.Settings` the plan was made under;
                the backward runs under them too (kernel launch and GEMM
                split thresholds)
    tf32        ``cudnn`` only: float32 engines may use TF32 (``allow_tf32``)
    reason      why a GPU plan is ``generic`` ("" otherwise); ``fallback``
                tells a cuDNN that could not be used from a choice (settings)
    """

    algorithm: str
    x_shape: tuple
    w_shape: tuple
    stride: tuple
    pad: tuple
    out_hw: tuple
    dtype: np.dtype
    stacked: bool = False
    n_chunks: int = 1
    threads: int = 1
    settings: Settings = dataclasses.field(default_factory=current_settings,
                                                  compare=False)
    tf32: bool = False
    reason: str = dataclasses.field(default="", compare=False)
    fallback: bool = dataclasses.field(default=False, compare=False)

    @property
    def kernel(self):
        return tuple(self.w_shape[2:])

    def chunks(self):
        """[(start, stop), ...]: the chunks of the batch, in order."""
        n, count = self.x_shape[0], self.n_chunks
        bounds = [i * n // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def chunk_groups(self):
        """The chunks grouped per pipeline thread: [[(start, stop), ...], ...]."""
        chunks = self.chunks()
        m, t = len(chunks), self.threads
        return [chunks[i * m // t:(i + 1) * m // t] for i in range(t)]

    def __repr__(self):
        name = self.algorithm
        if name == "pointwise":
            name += " stacked" if self.stacked else " gemm"
        (sh, sw), (ph, pw) = self.stride, self.pad
        stride = sh if sh == sw else self.stride
        pad = ph if ph == pw else self.pad
        text = (f"ConvPlan({name}: x {tuple(self.x_shape)} {np.dtype(self.dtype).name}, "
                f"w {tuple(self.w_shape)}, stride {stride}, pad {pad} -> "
                f"{self.out_hw[0]}x{self.out_hw[1]}")
        if name not in ("cudnn", "generic", "onednn"):
            largest = -(-self.x_shape[0] // self.n_chunks)
            text += (f"; {self.n_chunks} chunk{'s' if self.n_chunks > 1 else ''} of <= "
                     f"{largest} on {self.threads} thread{'s' if self.threads > 1 else ''}")
        elif self.tf32:
            text += "; TF32 allowed"
        if self.reason:
            text += f"; {self.reason}"
        return text + ")"


def geometry(x_shape, w_shape, stride, pad, op="conv2d"):
    """Check shapes and window; return (kernel, stride, pad, (OH, OW)) as pairs.

    Raises ``ValueError`` naming ``op`` for shapes that are not 4-D, a channel
    mismatch, empty shapes, a bad stride / pad or a kernel larger than the
    padded input."""
    x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W); got shape {x_shape}")
    if len(w_shape) != 4:
        raise ValueError(f"{op}: w must be 4-D (C_out, C_in, kh, kw); got shape {w_shape}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"{op}: channel mismatch: x has C={x_shape[1]} channels "
                         f"(shape {x_shape}) but w expects C_in={w_shape[1]} "
                         f"(shape {w_shape})")
    if min(x_shape) == 0 or min(w_shape) == 0:
        raise ValueError(f"{op}: empty array: x shape {x_shape}, w shape {w_shape}")
    stride = geo.pair(stride, "stride", op, minimum=1)
    pad = geo.pair(pad, "pad", op, minimum=0)
    kernel = w_shape[2:]
    out_hw = geo.window_geometry(op, x_shape, kernel, stride, pad)
    return kernel, stride, pad, out_hw


def _on_gpu(backend):
    """True for "gpu" / "cuda" / the cupy module, False for "cpu" / numpy."""
    if backend is np or backend == "cpu":
        return False
    if backend in ("gpu", "cuda") or (backend is not None and
                                      getattr(backend, "__name__", "") == "cupy"):
        return True
    raise ValueError(f"conv_plan: backend must be 'cpu', 'gpu' or an array module "
                     f"(numpy, cupy); got {backend!r}")


def conv_plan(x_shape, w_shape, stride=1, pad=0, dtype=np.float32, backend="cpu"):
    """The plan ``conv2d_forward`` follows for these arguments, in the current
    settings of :mod:`tinynorm.settings` (and, for the thread count, OpenBLAS's
    current thread count).

    x_shape (N, C, H, W), w_shape (C_out, C, kh, kw); stride, pad ints or
    (h, w) pairs; dtype of the arrays; backend "cpu" / "gpu" or an array module.

    >>> conv_plan((128, 32, 28, 28), (32, 32, 3, 3), 1, 1).algorithm
    'winograd4'
    """
    kernel, stride, pad, out_hw = geometry(x_shape, w_shape, stride, pad, op="conv_plan")
    return make_plan(tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape),
                     stride, pad, out_hw, check_dtype(dtype, "conv_plan"), _on_gpu(backend))


def check_dtype(dtype, op):
    """float32 or float64 (returned as a dtype); a one-line ValueError otherwise.

    float16 is refused rather than run: NumPy has no float16 GEMM, and the
    generic path's float16 results were off by several float16 ulps of the
    output's scale (max |error| 1.9e-3 at |y| <= 4.6), a bound nothing tests."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{op}: {dtype} is not supported (float32 or float64); cast first, "
                         f"e.g. x.astype('float32')")
    return dtype


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


def _gpu_algorithm(settings, x_shape, w_shape, stride, pad, dtype):
    """("cudnn" or "generic", reason, fallback) for CuPy arrays."""
    if settings.force_generic:
        return "generic", "force_generic is on", False
    if not settings.use_cudnn:
        return "generic", "use_cudnn is off", False
    ok, reason = cudnn.status()
    if ok:
        ok, reason = cudnn.supports(x_shape, w_shape, stride, pad, dtype, settings.allow_tf32)
    return ("cudnn", "", False) if ok else ("generic", reason, True)


def _winograd_tile(settings, x_shape, w_shape, out_hw):
    """4 or 2: the ``winograd_tile`` setting, or its ``"auto"`` rule.

    A padded tile costs what a full one does, and F(4x4)'s advantage (2.25
    transform-domain values per output against F(2x2)'s 4) is lost where its
    tiles overhang the output; F(2x2)'s cheaper transforms then win while the
    GEMMs are small.  Measured (2 cores, batch 128, forward + backward): 14x14
    outputs 64->64 and 32->64 channels 0.87x and 0.86x F(4x4)'s time,
    128->256 0.97x, 256->256 1.05x; 7x7 (both tiles overhang) 64->80 1.05x."""
    if settings.winograd_tile != "auto":
        return settings.winograd_tile
    oh, ow = out_hw
    area = {m: (-(-oh // m) * m) * (-(-ow // m) * m) for m in (2, 4)}
    small = max(x_shape[1], w_shape[0]) <= settings.winograd2_max_channels
    return 2 if small and area[2] < area[4] else 4


def _algorithm(settings, x_shape, w_shape, kernel, stride, pad, out_hw, dtype):
    if not numba_enabled(settings) or dtype not in kernels.FAST_DTYPES:
        return "generic"
    if settings.use_onednn and onednn.supports(x_shape, w_shape, dtype):
        return "onednn"
    if (settings.winograd and kernel == (3, 3) and stride == (1, 1)
            and min(x_shape[1], w_shape[0]) >= settings.winograd_min_channels):
        tile = _winograd_tile(settings, x_shape, w_shape, out_hw)
        return "winograd4" if tile == 4 else "winograd2"
    if _is_pointwise(kernel, stride, pad):
        return "pointwise"
    return "im2col"


def _bytes_per_sample(algorithm, x_shape, w_shape, out_hw, itemsize):
    """Bytes per sample of the workspaces a chunk is sized by.

    Winograd: the transform-domain buffer V or M, the larger.  im2col /
    pointwise: the larger of the im2col buffer (K = C*kh*kw rows of OH*OW
    columns) and the GEMM-output and dY buffers together (C_out rows each);
    counting only im2col let a layer with few input channels take
    whole-group chunks of large output-side buffers."""
    c, c_out = x_shape[1], w_shape[0]
    if algorithm in WINOGRAD_KERNELS:
        wg = WINOGRAD_KERNELS[algorithm]
        th, tw = wg.tiles(*out_hw)
        return wg.SLICES * max(c, c_out) * th * tw * itemsize
    k = c * w_shape[2] * w_shape[3]
    return max(k, 2 * c_out) * out_hw[0] * out_hw[1] * itemsize


def _winograd_cap(settings, algorithm, x_shape, w_shape, out_hw, per_sample):
    """Bytes per Winograd chunk: ``winograd_chunk_bytes``, or less where
    ``winograd_chunk_tiles`` * max(C, C_out) tiles (rounded up to whole
    samples) fit in less.  The S GEMMs (C_out, C) @ (C, tiles) need many more
    columns than rows to run at speed; past that, larger chunks only cost
    memory.  Measured (2 cores, batch 128, forward + backward): 32 tiles per
    channel against 16 MB chunks took 0.91-1.08x the time over ten cifar10-nv
    and ResNet-50 shapes at 16-128 channels (0.99x on average; 8 tiles per
    channel: up to 1.14x), and cut the width-0.25 cifar10-nv step's peak
    memory (its 32-channel 28x28 layers had 14 MB buffers, now 5 MB)."""
    cap = settings.winograd_chunk_bytes
    if settings.winograd_chunk_tiles:
        th, tw = WINOGRAD_KERNELS[algorithm].tiles(*out_hw)
        want = settings.winograd_chunk_tiles * max(x_shape[1], w_shape[0])
        cap = min(cap, -(-want // (th * tw)) * per_sample)
    return cap


def _chunk_count(n, bytes_per_sample, cap, min_count=1):
    """How many chunks of range(n): each under ``cap`` bytes if it can be, and
    at least ``min_count`` of them (a multiple of it) when n allows."""
    per = max(1, min(n, cap // max(1, bytes_per_sample)))
    count = -(-n // per)
    return min(n, -(-count // min_count) * min_count)


def make_plan(x_shape, w_shape, stride, pad, out_hw, dtype, gpu):
    """The plan for checked geometry (see :func:`conv_plan`)."""
    settings = current_settings()
    kernel = w_shape[2:]
    if gpu:
        algorithm, reason, fallback = _gpu_algorithm(settings, x_shape, w_shape, stride, pad,
                                                     dtype)
        tf32 = algorithm == "cudnn" and settings.allow_tf32 and dtype == np.float32
        return ConvPlan(algorithm, x_shape, w_shape, stride, pad, out_hw, dtype,
                        settings=settings, tf32=tf32, reason=reason, fallback=fallback)
    algorithm = _algorithm(settings, x_shape, w_shape, kernel, stride, pad, out_hw, dtype)
    if algorithm in ("generic", "onednn"):
        return ConvPlan(algorithm, x_shape, w_shape, stride, pad, out_hw, dtype,
                        settings=settings)
    n = x_shape[0]
    stacked = algorithm == "pointwise" and _use_stacked(x_shape[1], w_shape[0],
                                                        out_hw[0] * out_hw[1])
    per_sample = _bytes_per_sample(algorithm, x_shape, w_shape, out_hw, dtype.itemsize)
    cap = (_winograd_cap(settings, algorithm, x_shape, w_shape, out_hw, per_sample)
           if algorithm in WINOGRAD_KERNELS else settings.conv_chunk_bytes)
    threads = settings.conv_threads
    if threads is None:
        flops = n * out_hw[0] * out_hw[1] * math.prod(w_shape)
        threads = _gemm.threads_for(flops, settings.conv_split_min_flops)
    if threads == 1 or n < threads:
        threads, n_chunks = 1, _chunk_count(n, per_sample, cap)
    else:
        n_chunks = _chunk_count(n, per_sample, cap, min_count=threads)
    return ConvPlan(algorithm, x_shape, w_shape, stride, pad, out_hw, dtype, stacked,
                    n_chunks, threads, settings)

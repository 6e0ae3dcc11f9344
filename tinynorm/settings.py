"""The one scoped configuration of tinynorm's fast paths (``tinynorm.settings``;
``tinynorm.config`` is its earlier name, and its messages still say so).

Every tunable that selects or shapes a fast path -- which convolution
algorithm may run, how large the batch chunks of a convolution are, when a
numba kernel or a GEMM goes parallel, whether numba kernels run at all -- is
a setting here, changed for a block and restored after it (in the spirit of
``chainer.using_config`` and tinygrad's ``Context``)::

    from tinynorm import settings

    with settings.using(winograd_tile=2, conv_chunk_bytes=8 << 20):
        y, cache = ops.conv2d_forward(x, w, b, 1, 1)     # F(2x2, 3x3), 8 MB chunks
    settings.get("winograd_tile")                        # 4 again

Unknown names and out-of-range values raise a one-line ``ValueError`` naming
the setting.  The ops read the settings when they choose a path (e.g.
:func:`tinynorm.ops.conv_plan`), and a backward follows what its forward
chose (the plan in the cache), not the settings in force when it runs.

Scoping uses :mod:`contextvars`: a ``using`` block applies to the thread (or
asyncio task) that opens it, and other threads keep their own settings.  A
thread started with ``threading.Thread`` begins at the defaults; the worker
threads tinynorm starts itself (the convolution pipeline, split GEMMs) run in
a copy of their caller's context, so they see the caller's settings.

``force_generic=True`` makes NumPy arrays take exactly the branches CuPy arrays
take (the array-generic expressions and the ``generic`` convolution plan, no
numba kernel; CuPy arrays then skip cuDNN too): the CPU tests hold that code
to the fast CPU paths, so the GPU runs code that is tested without a GPU.

The environment variable ``TINYNORM_NO_NUMBA=1`` (read once, at import) sets
the default of ``use_numba`` to False: every op then runs its array code
(convolution the array-generic im2col + matmul, batch norm, pooling and ReLU
their NumPy expressions).  numba is still imported (it stays a dependency).

The settings, their defaults and what they do: :data:`SETTINGS`, or
``python -c "from tinynorm import settings; print(settings.describe())"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
import os
from typing import Optional, Union

__all__ = ["Settings", "SETTINGS", "using", "get", "current", "defaults", "describe",
           "numba_enabled"]


def _numba_default() -> bool:
    return os.environ.get("TINYNORM_NO_NUMBA", "") in ("", "0")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One immutable set of values of every setting (see :data:`SETTINGS`)."""

    # -- convolution: which algorithm (tinynorm.ops.conv_plan) -----------------
    winograd: bool = True
    winograd_tile: Union[int, str] = "auto"
    winograd2_max_channels: int = 128
    winograd_min_channels: int = 16
    use_cudnn: bool = True
    allow_tf32: bool = False
    use_onednn: bool = True
    channels_last: Union[bool, str] = "auto"
    fuse_relu: bool = True
    # -- convolution: chunks of the batch and pipeline threads ----------------
    conv_chunk_bytes: int = 4 << 20
    winograd_chunk_bytes: int = 16 << 20
    winograd_chunk_tiles: int = 32
    conv_threads: Optional[int] = None
    conv_split_min_flops: int = 1 << 22
    # -- threads of GEMMs and numba kernels -----------------------------------
    split_min_flops: int = 1 << 24
    parallel_kernels: Union[bool, str] = "auto"
    parallel_min_work: int = 1 << 18
    chunks_per_thread: int = 4
    winograd4_blocks: int = 64
    # -- numba kernels at all, and batch norm's -------------------------------
    use_numba: bool = True
    bn_fused_min_size: int = 1 << 16
    # -- the array-generic code on every backend ------------------------------
    force_generic: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check(field.name, getattr(self, field.name))


def _is_bool(v):
    return isinstance(v, bool)


def _is_int(minimum):
    def check(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum
    return check


# name -> (check, what a valid value is, what the setting does)
SETTINGS = {
    "winograd": (_is_bool, "a bool",
                 "Winograd for 3x3 / stride-1 CPU convolutions with enough channels"),
    "winograd_tile": (lambda v: v == "auto" or (_is_int(2)(v) and v in (2, 4)),
                      "'auto', 2 or 4",
                      "output tile of the Winograd path: 4 = F(4x4, 3x3) (36 GEMMs, 4x fewer "
                      "multiply-adds than im2col), 2 = F(2x2, 3x3) (16 GEMMs, 2.25x fewer, "
                      "rounding as im2col's); 'auto': 2 where 2x2 tiles cover the output "
                      "with less padding than 4x4 ones and the layer has at most "
                      "winograd2_max_channels channels, else 4"),
    "winograd2_max_channels": (_is_int(1), "an int >= 1",
                               "winograd_tile 'auto' takes F(2x2, 3x3) only up to this many "
                               "input and output channels (above it the GEMMs dominate, and "
                               "F(4x4)'s fewer multiply-adds win even with padded tiles)"),
    "winograd_min_channels": (_is_int(1), "an int >= 1",
                              "Winograd only when input and output channels are both at "
                              "least this (below it its GEMMs are too thin)"),
    "use_cudnn": (_is_bool, "a bool",
                  "GPU convolutions through cuDNN when it imports (else im2col + matmul)"),
    "allow_tf32": (_is_bool, "a bool",
                   "float32 cuDNN convolutions may use TF32 tensor cores (10-bit mantissa "
                   "inputs; off: cuDNN engines with the TENSOR_CORE or DOWN_CONVERT_INPUTS "
                   "numerical note are deselected)"),
    "use_onednn": (_is_bool, "a bool",
                   "float32 CPU convolutions through oneDNN when its library loads "
                   "(pip install onednn-cpu-gomp; else the hand-written plans)"),
    "channels_last": (lambda v: v == "auto" or _is_bool(v), "'auto', True or False",
                      "CPU convolutions answer in channels-last memory (NCHW shape, NHWC "
                      "memory; tinynorm.ops.layout), so a model's activations turn "
                      "channels-last at its first convolution and stay so; 'auto': where "
                      "the convolution runs on oneDNN (whose fast kernels want it), not "
                      "on the hand-written plans (which want NCHW)"),
    "fuse_relu": (_is_bool, "a bool",
                  "a convolution or batch norm followed by a ReLU in a Sequential runs "
                  "as one forward (the ReLU in place on the fresh output, or in batch "
                  "norm's channels-last pass), and a residual block's sum and ReLU as "
                  "one pass; "
                  "the same values and gradients (tinynorm.nn.base)"),
    "conv_chunk_bytes": (_is_int(1), "an int >= 1",
                         "bytes per batch chunk of the im2col / GEMM workspaces of a CPU "
                         "convolution (a few MB: each thread's chunk stays in cache)"),
    "winograd_chunk_bytes": (_is_int(1), "an int >= 1",
                             "bytes per batch chunk of the Winograd transform buffers"),
    "winograd_chunk_tiles": (_is_int(0), "an int >= 0",
                             "Winograd chunks of about this many times max(C, C_out) tiles "
                             "(whole samples), when that is under winograd_chunk_bytes: "
                             "enough columns for the GEMMs, small enough to stay in cache; "
                             "0: chunks as large as winograd_chunk_bytes allows"),
    "conv_threads": (lambda v: v is None or _is_int(1)(v), "None or an int >= 1",
                     "threads of the convolution batch pipeline; None: OpenBLAS's thread "
                     "count for large convolutions, 1 (the calling thread) for small ones"),
    "conv_split_min_flops": (_is_int(0), "an int >= 0",
                             "multiply-adds below which a CPU convolution's batch pipeline "
                             "runs on the calling thread when conv_threads is None (a "
                             "pipeline hands whole chunks to its threads, so it pays off "
                             "on smaller work than a split GEMM)"),
    "split_min_flops": (_is_int(0), "an int >= 0",
                        "multiply-adds below which a GEMM runs on one BLAS thread, above "
                        "which it is split over single-threaded BLAS calls"),
    "parallel_kernels": (lambda v: v == "auto" or _is_bool(v), "'auto', True or False",
                         "numba kernels on all numba threads; 'auto': only when OpenBLAS's "
                         "idle workers sleep promptly (OPENBLAS_THREAD_TIMEOUT set low)"),
    "parallel_min_work": (_is_int(0), "an int >= 0",
                          "elements a numba kernel touches below which it runs on one thread"),
    "chunks_per_thread": (_is_int(0), "an int >= 0",
                          "dynamic-schedule chunks per thread of a parallel numba kernel; "
                          "0: numba's static split"),
    "winograd4_blocks": (_is_int(1), "an int >= 1",
                         "blocks of planes (each with its own scratch) of the parallel "
                         "F(4x4, 3x3) transform kernels"),
    "use_numba": (_is_bool, "a bool",
                  "numba kernels at all; False: every op runs its array code (default "
                  "False when TINYNORM_NO_NUMBA=1)"),
    "bn_fused_min_size": (_is_int(0), "an int >= 0",
                          "elements below which batch norm runs its NumPy code instead of "
                          "the fused numba kernels"),
    "force_generic": (_is_bool, "a bool",
                      "every op runs the array-generic code CuPy arrays run without cuDNN, "
                      "on NumPy arrays too: the generic im2col + matmul convolution plan "
                      "(also on CuPy: no cuDNN), no numba kernel"),
}

# every field of Settings has exactly one entry above
assert set(SETTINGS) == {f.name for f in dataclasses.fields(Settings)}


def _check(name, value):
    if name not in SETTINGS:
        raise ValueError(f"tinynorm.config: unknown setting {name!r}; known: "
                         f"{', '.join(SETTINGS)}")
    check, valid, _ = SETTINGS[name]
    if not check(value):
        raise ValueError(f"tinynorm.config: {name} must be {valid}; got {value!r}")


_DEFAULTS = Settings(use_numba=_numba_default())
_current = contextvars.ContextVar("tinynorm.config", default=_DEFAULTS)


@contextlib.contextmanager
def using(settings: Optional[Settings] = None, /, **overrides):
    """Change settings for the ``with`` block (this thread / task only).

    ``using(name=value, ...)`` overrides the named settings on top of the
    current ones.  ``using(snapshot)`` with a :class:`Settings` (e.g. the one a
    forward pass recorded) makes exactly those values current; further
    keywords override it.  Every name and value is checked before anything
    changes (a :class:`Settings` checks its values when it is made).  Yields
    the :class:`Settings` in force inside the block.
    """
    for name in overrides:
        if name not in SETTINGS:
            _check(name, None)            # raises: unknown setting
    if settings is not None and not isinstance(settings, Settings):
        raise ValueError(f"tinynorm.config: using() takes a Settings snapshot or "
                         f"keywords; got {type(settings).__name__}")
    base = _current.get() if settings is None else settings
    new = dataclasses.replace(base, **overrides) if overrides else base
    token = _current.set(new)
    try:
        yield new
    finally:
        _current.reset(token)


def current() -> Settings:
    """The :class:`Settings` in force here (immutable: a snapshot)."""
    return _current.get()


def get(name: str):
    """The current value of one setting (ValueError for an unknown name)."""
    if name not in SETTINGS:
        _check(name, None)                # raises: unknown setting
    return getattr(_current.get(), name)


def defaults() -> Settings:
    """The values outside every ``using`` block (after TINYNORM_NO_NUMBA)."""
    return _DEFAULTS


def numba_enabled(settings: Optional[Settings] = None) -> bool:
    """Whether numba kernels may run under ``settings`` (default: the current
    ones): ``use_numba`` on and ``force_generic`` off.  The one predicate every
    op's numba branch asks."""
    settings = settings if settings is not None else _current.get()
    return settings.use_numba and not settings.force_generic


def describe() -> str:
    """A table of the settings: name, default, current value, what it does."""
    now = current()
    rows = [f"{'setting':<22} {'default':>10} {'current':>10}  meaning"]
    for name, (_, _, doc) in SETTINGS.items():
        rows.append(f"{name:<22} {getattr(_DEFAULTS, name)!s:>10} "
                    f"{getattr(now, name)!s:>10}  {doc}")
    return "\n".join(rows)

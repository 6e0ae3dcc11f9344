"""The one module that knows NumPy from CuPy.

Everything else asks this module for the array module (``xp``), the device and
the random generator.  CuPy is imported once, here, inside try/except; a GPU is
used only when the caller asks for it *and* ``cupy.is_available()`` is true
(a successful ``import cupy`` does not mean a usable GPU).

The GPU paths are written against CuPy's documented API and have never been
run on a GPU by the tinynorm developers (their machines have none).
"""
from __future__ import annotations

import numpy as np

try:  # the only cupy import in the package
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None

__all__ = [
    "np", "cupy", "gpu_available", "get_array_module", "xp_for", "to_device",
    "to_numpy", "default_rng", "DEFAULT_DTYPE", "is_array", "check_finite",
    "tune_allocator",
]

cupy = _cupy
# float32 for training; gradient checks run in float64.
DEFAULT_DTYPE = np.float32


def gpu_available() -> bool:
    """True when CuPy imports *and* reports a usable CUDA device."""
    if _cupy is None:
        return False
    try:
        return bool(_cupy.is_available())
    except Exception:
        return False


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def xp_for(device: str):
    """The array module for a device name: ``"cpu"`` or ``"gpu"``."""
    if device == "cpu":
        return np
    if device in ("gpu", "cuda"):
        if not gpu_available():
            raise RuntimeError(
                "device 'gpu' was requested but no usable GPU was found "
                "(cupy is %s; cupy.is_available() is False or raised)"
                % ("not installed" if _cupy is None else "installed"))
        return _cupy
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")


def is_array(a) -> bool:
    return isinstance(a, np.ndarray) or (_cupy is not None and isinstance(a, _cupy.ndarray))


def to_device(a, device: str):
    """Copy a host or device array to ``device`` (no copy when it is there)."""
    xp = xp_for(device)
    if xp is np:
        return to_numpy(a)
    return _cupy.asarray(a)


def to_numpy(a):
    """A NumPy array for any backend array (or scalar)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def default_rng(seed, device: str = "cpu"):
    """A seeded generator for the backend of ``device``.

    NumPy: ``numpy.random.Generator(PCG64(seed))``; CuPy:
    ``cupy.random.default_rng(seed)`` (same interface for the methods
    tinynorm uses: ``random``, ``standard_normal``, ``integers``).
    """
    if xp_for(device) is np:
        return np.random.default_rng(seed)
    return _cupy.random.default_rng(seed)


def check_finite(name: str, a) -> None:
    """Raise ``FloatingPointError`` naming ``name`` when ``a`` holds NaN or Inf."""
    xp = get_array_module(a)
    if not bool(xp.isfinite(a).all()):
        n_bad = int((~xp.isfinite(a)).sum())
        raise FloatingPointError(f"{name} contains {n_bad} non-finite value(s) (NaN or Inf)")


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_allocator_tuned = None


def tune_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse, process-wide; True if done.

    By default glibc serves every allocation above its mmap threshold (128 KB
    to 32 MB, adaptive) with a fresh ``mmap`` and returns it with ``munmap``
    when freed, and trims the heap's free top.  A training step allocates and
    frees activations of tens to hundreds of MB, so every step page-faults
    them in again: the kernel zeroes each 4 KB page on first touch (measured
    here: ~4.5 ms per 51 MB array, as long as the op that writes it).  This
    sets ``M_MMAP_MAX = 0`` (everything comes from the heap) and
    ``M_TRIM_THRESHOLD`` to 2 GB - 1 (the largest mallopt accepts), which is
    what ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``
    does when set before the process starts.  The cost: memory freed by the
    process stays in its heap (its peak RSS stays allocated until exit).

    Called explicitly by the ``tinynorm`` command, the trainer's entry points
    and the benchmarks -- never on import.  Does nothing (returns False) where
    glibc's ``mallopt`` is not available (macOS, musl, Windows).
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    ok = False
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        ok = False
    _allocator_tuned = ok
    return ok

"""The one module that knows NumPy from CuPy.

Everything else asks this module for the array module (``xp``), the device and
the random generator.  CuPy is imported once, here, inside try/except; a GPU is
used only when the caller asks for it *and* ``cupy.is_available()`` is true
(a successful ``import cupy`` does not mean a usable GPU).

Devices are named ``"cpu"`` (NumPy) and ``"gpu"`` (CuPy, the current CUDA
device).  A model moves to one as a whole (``Layer.to``); batches go there
through :class:`HostToDevice` (pinned staging buffers and a copy stream on
the GPU); :func:`synchronize` waits for the device before a timer is read.

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
    "tune_allocator", "DEVICES", "DeviceError", "check_device", "device_of",
    "default_device", "synchronize", "HostToDevice", "versions",
]

DEVICES = ("cpu", "gpu")


class DeviceError(ValueError):
    """A device name that is unknown, or a GPU asked for where none is usable."""

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


def _gpu_unusable_reason() -> str:
    if _cupy is None:
        return "CuPy is not installed (pip install 'tinynorm[gpu]' or 'tinynorm[gpu-cuda13]')"
    try:
        if _cupy.is_available():
            return ""
        return "CuPy is installed but cupy.is_available() is False (no CUDA device or driver)"
    except Exception as e:  # a broken CUDA runtime
        return f"cupy.is_available() raised {type(e).__name__}: {e}"


def xp_for(device: str):
    """The array module for a device name: ``"cpu"`` or ``"gpu"`` (``"cuda"``
    is accepted as a synonym).  :class:`DeviceError` (a ValueError, one line)
    for an unknown name or a GPU that is not usable."""
    if device == "cpu":
        return np
    if device in ("gpu", "cuda"):
        reason = _gpu_unusable_reason()
        if reason:
            raise DeviceError(f"device 'gpu' was requested but no GPU is usable: {reason}")
        return _cupy
    raise DeviceError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")


def check_device(device: str) -> str:
    """``device`` normalized to "cpu" / "gpu" once it is known to be usable."""
    xp_for(device)
    return "cpu" if device == "cpu" else "gpu"


def device_of(a) -> str:
    """"gpu" for a CuPy array, "cpu" for anything else."""
    return "gpu" if _cupy is not None and isinstance(a, _cupy.ndarray) else "cpu"


def default_device() -> str:
    """"gpu" when one is usable, else "cpu" (the ``paper`` presets' choice)."""
    return "gpu" if gpu_available() else "cpu"


def synchronize(device=None) -> None:
    """Wait until the work queued on ``device`` has finished; a no-op on the CPU.

    ``device``: "cpu", "gpu", an array (its device), or None (the current CUDA
    device when a GPU is usable, else nothing).  GPU kernels run
    asynchronously: a host timer read without this measures the launches."""
    if device is not None and not isinstance(device, str):
        device = device_of(device)
    if device == "cpu" or (device is None and not gpu_available()):
        return
    xp_for("gpu")
    _cupy.cuda.Device().synchronize()


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


class HostToDevice:
    """Copies host batches to a device ahead of their use.

    ``pending = stage((x, y))`` starts the copy of a tuple of NumPy arrays;
    ``pending.get()`` returns them on the device, ready for the caller's
    stream.  Stage batch b+1 before computing on batch b and the copy overlaps
    the computation.

    CPU: ``get()`` returns the arrays themselves (no copy).  GPU: every array
    is written into a pinned (page-locked) host buffer -- one set per slot,
    ``slots`` in flight at most -- and copied by ``cudaMemcpyAsync`` on a
    separate non-blocking stream.  The device array is allocated on the
    caller's (compute) stream and the copy stream first waits for an event
    recorded there: CuPy's pool may hand out memory that kernels queued
    earlier on the compute stream still read, and the copy must not overwrite
    it before they ran.  ``get()`` makes the compute stream wait for the
    copy's event; a slot's pinned buffers are rewritten only after its
    previous copy has finished.
    """

    def __init__(self, device: str, slots: int = 2):
        self.device = check_device(device)
        if slots < 1:
            raise ValueError(f"HostToDevice: slots must be >= 1, got {slots}")
        self._slots = int(slots)
        self._count = 0
        if self.device == "gpu":
            self._stream = _cupy.cuda.Stream(non_blocking=True)
            self._pinned = [dict() for _ in range(self._slots)]   # slot -> {k: (mem, nbytes)}
            self._done = [None] * self._slots                      # slot -> Event of its copy

    def stage(self, arrays):
        arrays = tuple(arrays)
        if self.device == "cpu":
            return _Ready(arrays)
        slot = self._count % self._slots
        self._count += 1
        if self._done[slot] is not None:
            self._done[slot].synchronize()       # its pinned buffers are free again
        compute = _cupy.cuda.get_current_stream()
        pairs = []
        for k, a in enumerate(arrays):
            a = np.ascontiguousarray(a)
            mem, size = self._pinned[slot].get(k, (None, 0))
            if size < a.nbytes:
                mem, size = _cupy.cuda.alloc_pinned_memory(a.nbytes), a.nbytes
                self._pinned[slot][k] = (mem, size)
            host = np.frombuffer(mem, a.dtype, a.size).reshape(a.shape)
            host[...] = a
            pairs.append((_cupy.empty(a.shape, a.dtype), host))   # on the compute stream
        self._stream.wait_event(compute.record())
        for dev, host in pairs:
            dev.set(host, stream=self._stream)
        done = self._stream.record()
        self._done[slot] = done
        return _InFlight(tuple(dev for dev, _ in pairs), done)


class _Ready:
    def __init__(self, arrays):
        self._arrays = arrays

    def get(self):
        return self._arrays


class _InFlight:
    def __init__(self, arrays, event):
        self._arrays, self._event = arrays, event

    def get(self):
        _cupy.cuda.get_current_stream().wait_event(self._event)
        return self._arrays


def versions() -> dict:
    """What ``tinynorm info`` prints: NumPy, numba, CuPy, CUDA runtime and driver,
    the GPU's name, and why a GPU is not usable (empty when it is)."""
    out = {"numpy": np.__version__}
    try:
        import numba
        out["numba"] = numba.__version__
    except Exception as e:  # noqa: BLE001 -- reported, not raised
        out["numba"] = f"unavailable ({type(e).__name__})"
    out["cupy"] = _cupy.__version__ if _cupy is not None else "not installed"
    out["gpu_unusable"] = _gpu_unusable_reason()
    if _cupy is not None and not out["gpu_unusable"]:
        def cuda_version(v):
            return f"{v // 1000}.{(v % 1000) // 10}"
        try:
            out["cuda_runtime"] = cuda_version(_cupy.cuda.runtime.runtimeGetVersion())
            out["cuda_driver"] = cuda_version(_cupy.cuda.runtime.driverGetVersion())
            device = _cupy.cuda.Device()
            props = _cupy.cuda.runtime.getDeviceProperties(device.id)
            name = props["name"]
            out["gpu"] = (f"{name.decode() if isinstance(name, bytes) else name} "
                          f"(device {device.id}, compute capability {device.compute_capability}, "
                          f"{props['totalGlobalMem'] / 2**30:.0f} GiB)")
        except Exception as e:  # noqa: BLE001
            out["gpu"] = f"query failed: {type(e).__name__}: {e}"
    return out


def nccl():
    """CuPy's NCCL bindings (``cupy.cuda.nccl``), for tinynorm.parallel; None when
    CuPy or its NCCL support is missing."""
    if _cupy is None:
        return None
    try:
        import importlib
        module = importlib.import_module("cupy.cuda.nccl")
    except Exception:  # ImportError, or libnccl failing to load
        return None
    # CuPy 14 imports cupy.cuda.nccl without libnccl and says so in `available`
    # (its functions then fail with AttributeError); older CuPy raised on import
    if not getattr(module, "available", True):
        return None
    return module


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

"""How the numba kernels of the ops run: on how many threads, and the
single-threaded twins they run as.

Every numba kernel of the ops (im2col/col2im, Winograd, pooling, activations)
is started through :func:`launch`, the one place that decides how many
threads it gets; see :func:`blas_workers_spin` for why that is sometimes one.
:func:`numba_ok` says whether the kernels may run at all (the ``use_numba`` and
``force_generic`` settings of :mod:`tinynorm.settings`, NumPy float arrays).
"""
from __future__ import annotations

import os
import types

import numba
import numpy as np
from numba import njit

from ..settings import current as current_settings, numba_enabled

__all__ = ["FAST_DTYPES", "launch", "blas_workers_spin", "numba_ok", "serial_twin",
           "function_copy", "fast_ok"]

# The dtypes the numba kernels are compiled for.
FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def function_copy(kernel, suffix, **overrides):
    """A copy of the numba ``kernel``'s Python function, named
    ``<name>_<suffix>``, whose globals ``overrides`` replace (e.g. a helper it
    calls), ready for ``njit`` with other options.

    numba names a function's on-disk cache after its qualified name and first
    line, and keys the entries by signature and bytecode, not by compile
    options or globals: a copy under the same name would share the kernel's
    cache entry, and both would run whichever of the two was compiled first."""
    f = kernel.py_func
    globals_ = dict(f.__globals__, **overrides) if overrides else f.__globals__
    copy = types.FunctionType(f.__code__, globals_, f"{f.__name__}_{suffix}",
                              f.__defaults__, f.__closure__)
    copy.__qualname__ = f"{f.__qualname__}_{suffix}"
    copy.__doc__ = f.__doc__
    return copy


def serial_twin(kernel, **options):
    """The single-threaded twin of the ``parallel=True`` numba ``kernel``
    (``prange`` runs as ``range``), which releases the GIL: conv2d's batch
    pipeline runs one per Python thread, each on its own chunk of samples
    (see ``conv/pipeline.py``).  ``options``: further ``njit`` options
    (e.g. the kernel's ``fastmath``).  Compiled from
    :func:`function_copy` (``<name>_serial``)."""
    twin = njit(nogil=True, cache=True, **options)(function_copy(kernel, "serial"))
    _SERIAL_TWINS[kernel] = twin
    return twin


# parallel kernel -> its serial twin, which :func:`launch` runs when it runs a
# kernel on one thread (the same loop without numba's parallel scheduler)
_SERIAL_TWINS = {}


def blas_workers_spin() -> bool:
    """True unless the process was started with a short OpenBLAS thread timeout.

    OpenBLAS's idle worker threads busy-wait for about 2**28 cycles (~0.1 s)
    after every GEMM before they sleep, unless ``OPENBLAS_THREAD_TIMEOUT``
    (read once, when NumPy loads OpenBLAS) sets a shorter 2**k.  A numba
    worker started in that window shares its core with the spinner, and a
    2-thread kernel ends up slower than a 1-thread one.  Measured on the
    2-core development machine, im2col of cifar10-nv conv4 right after a
    GEMM: 18.5 ms on 2 threads, 16 ms on 1 thread, 10 ms on 2 threads with
    ``OPENBLAS_THREAD_TIMEOUT=4``.  In a training step every kernel follows a
    GEMM by well under 0.1 s.
    """
    value = os.environ.get("OPENBLAS_THREAD_TIMEOUT") or os.environ.get("GOTO_THREAD_TIMEOUT")
    try:
        return not (value is not None and int(value) <= 16)
    except ValueError:
        return True


def launch(kernel, n_iter, work, *args):
    """Run a ``parallel=True`` numba kernel whose prange has ``n_iter`` iterations.

    The policy is three settings of :mod:`tinynorm.settings`.  It runs on the
    calling thread only (the kernel's :func:`serial_twin` if it has one, else
    the kernel with numba at one thread) when the job is small (``work`` elements <
    ``parallel_min_work``: waking a second thread costs more than it saves)
    or when :func:`blas_workers_spin` says a second thread would fight
    OpenBLAS's spinning workers (``parallel_kernels="auto"``; True / False
    force it).  Otherwise it uses a dynamic schedule in chunks of about
    ``n_iter / (chunks_per_thread * threads)`` iterations, so that a thread
    slowed down by a competing process takes fewer chunks instead of holding
    up the whole kernel (``chunks_per_thread=0``: numba's static split).
    """
    settings = current_settings()
    n_threads = numba.get_num_threads()
    parallel = settings.parallel_kernels
    if parallel == "auto":
        parallel = not blas_workers_spin()
    if (n_threads == 1 or not parallel or work < settings.parallel_min_work
            or n_iter < 2):
        twin = _SERIAL_TWINS.get(kernel)
        if twin is not None:
            return twin(*args)
        if n_threads == 1:
            return kernel(*args)
        numba.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(n_threads)
    if settings.chunks_per_thread <= 0:
        return kernel(*args)
    with numba.parallel_chunksize(max(1, n_iter // (settings.chunks_per_thread * n_threads))):
        return kernel(*args)


def fast_ok(*arrays):
    """True when every array is a NumPy float32 / float64 array (what the kernels
    are compiled for), whatever the settings."""
    return all(isinstance(a, np.ndarray) and a.dtype in FAST_DTYPES for a in arrays)


def numba_ok(*arrays):
    """True when the numba kernels may run on ``arrays``: NumPy float32 /
    float64 arrays, with the ``use_numba`` setting on and ``force_generic`` off."""
    return numba_enabled() and fast_ok(*arrays)

"""Large float GEMMs split into independent single-threaded BLAS calls.

OpenBLAS parallelises one GEMM by splitting its output among its threads,
which then meet at a barrier after every K-block of the product (a few
hundred of them for the weight gradient of a conv, whose K is N*OH*OW).
When another process holds one of the cores, the thread that waits at each
barrier loses a scheduler time slice each time: measured on the 2-core
development machine with a training job running beside it, the cifar10-nv
conv2 weight gradient (128 x 100352 @ 100352 x 1152) took 1.8 s with
OpenBLAS's two threads and 0.32 s as two single-threaded halves; on an idle
machine the two are equally fast (the split is exact and each half is a
large GEMM).  So for large products this module runs ``T`` single-threaded
BLAS calls on ``T`` Python threads (NumPy releases the GIL inside matmul),
each on its own slice, with one join at the end:

* :func:`matmul` -- ``out = a @ b`` split along the columns of ``b`` (2-D) or
  along the batch axis (3-D, NumPy's stacked matmul);
* :func:`matmul_nt_sum` -- ``a @ b.T`` for a long shared inner dimension,
  split along it (each thread's partial product summed at the end).

Small products (fewer multiply-adds than the ``split_min_flops`` setting of
:mod:`tinynorm.settings`) run on one BLAS thread.  The worker threads run each
job in a copy of the caller's context, so the caller's ``settings.using`` scope
holds inside the jobs.

T is NumPy's OpenBLAS's own thread count at the time of the call (so
``threadpoolctl.threadpool_limits`` still governs it); small products, T = 1,
non-NumPy arrays or a BLAS other than OpenBLAS go straight to ``numpy.matmul``.
While a split call runs, OpenBLAS is set to one thread process-wide.

A process can hold several OpenBLAS libraries: with SciPy's wheels beside
NumPy's, numba loads SciPy's own copy when its first kernel runs.  threadpoolctl lists them in
an order that changes from process to process, so the one NumPy calls is
picked by its path (:func:`numpy_first`), and a thread setting is applied to
every OpenBLAS, so that a wrong pick cannot leave NumPy's at two threads
under two callers.
"""
from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import settings

__all__ = ["matmul", "matmul_nt_sum", "blas_threads", "threads_for", "run_threads"]

# The default split_min_flops, 1 << 24: below it a split costs more (thread
# hand-off ~50 us) than it saves.

_lock = threading.Lock()
_state = {"libs": None, "pool": None, "pool_size": 0}


def numpy_first(controllers, numpy_dir=None):
    """``controllers`` (threadpoolctl's, with ``.filepath``) reordered so that
    the one inside NumPy's installation (its package directory, or the
    ``numpy.libs`` / ``numpy/.dylibs`` of a wheel) comes first; the order is
    otherwise kept."""
    if numpy_dir is None:
        numpy_dir = os.path.dirname(np.__file__)
    numpy_dir = os.path.realpath(numpy_dir)
    roots = (os.path.join(numpy_dir, ""), numpy_dir + ".libs" + os.sep)

    def inside_numpy(c):
        path = os.path.realpath(getattr(c, "filepath", "") or "")
        return path.startswith(roots)
    return sorted(controllers, key=lambda c: not inside_numpy(c))


def _libs():
    """threadpoolctl's controllers of every OpenBLAS loaded, NumPy's first;
    [] when there is none (or threadpoolctl cannot inspect the process)."""
    if _state["libs"] is None:
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController().select(internal_api="openblas")
            _state["libs"] = numpy_first(ctl.lib_controllers)
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _state["libs"] = []
    return _state["libs"]


def _blas():
    """The controller of NumPy's OpenBLAS, or None."""
    libs = _libs()
    return libs[0] if libs else None


def _set_threads(n):
    """Every OpenBLAS at ``n`` threads; returns the (library, previous count)
    pairs it changed, for :func:`_restore`."""
    changed = []
    for lib in _libs():
        previous = lib.get_num_threads()
        if previous != n:
            lib.set_num_threads(n)
            changed.append((lib, previous))
    return changed


def _restore(changed):
    for lib, previous in changed:
        lib.set_num_threads(previous)


def blas_threads() -> int:
    """NumPy's OpenBLAS's current thread count (1 when it cannot be found)."""
    lib = _blas()
    if lib is None:
        return 1
    try:
        return max(1, int(lib.get_num_threads()))
    except Exception:
        return 1


def _pool(n):
    if _state["pool_size"] < n:
        _state["pool"] = ThreadPoolExecutor(n, thread_name_prefix="tinynorm-gemm")
        _state["pool_size"] = n
    return _state["pool"]


def _bounds(total, parts):
    step = -(-total // parts)
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def _run_split(jobs, n_threads):
    """Run the callables ``jobs`` on ``n_threads`` threads with OpenBLAS at 1 thread."""
    with _lock:                       # one split call at a time (it owns the BLAS setting)
        previous = _set_threads(1)
        try:
            # each job in its own copy of this context (one Context cannot be
            # entered by two threads at once): the caller's settings hold there
            futures = [_pool(n_threads).submit(contextvars.copy_context().run, job)
                       for job in jobs[1:]]
            first = jobs[0]()         # the calling thread takes the first slice
            return [first] + [f.result() for f in futures]
        finally:
            _restore(previous)


def _single_threaded(fn):
    """fn() with OpenBLAS at one thread.  For small products: waking a second
    BLAS thread costs more than it saves, and when another process holds the
    other core it costs a time slice (measured: a 2.6 M multiply-add GEMM of
    cifar10-nv conv8 at width 0.25, batch 16, 0.3 ms or 16 ms from run to run on
    two threads; 0.2 ms on one)."""
    if _blas() is None or not _lock.acquire(blocking=False):
        return fn()               # no OpenBLAS, or a split owns the setting (1 thread)
    try:
        changed = _set_threads(1)
        try:
            return fn()
        finally:
            _restore(changed)
    finally:
        _lock.release()


def run_threads(jobs):
    """Run the callables ``jobs`` at once, one per thread (the first on the
    calling thread), with OpenBLAS at one thread; return their results in order.
    For work split by the caller (conv2d's batch pipeline); ``len(jobs)``
    should be what :func:`threads_for` returned."""
    return _run_split(jobs, len(jobs))


def threads_for(flops, min_flops=None):
    """How many threads a split of this much work (multiply-adds) on NumPy
    float arrays should use: OpenBLAS's thread count, or 1 for work under
    ``min_flops`` (default: the ``split_min_flops`` setting), no OpenBLAS, or
    a call made while another split runs."""
    if min_flops is None:
        min_flops = settings.current().split_min_flops
    if flops < min_flops:
        return 1
    n = blas_threads()
    if n > 1 and _lock.locked():      # called from inside a split (or another thread's)
        return 1
    return n


def _split_threads(*arrays, flops):
    if flops < settings.current().split_min_flops:
        return 1
    if not all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in arrays):
        return 1
    n = blas_threads()
    if n > 1 and _lock.locked():      # called from inside a split (or another thread's)
        return 1
    return n


def matmul(a, b, out=None):
    """``a @ b`` like ``numpy.matmul(a, b, out=out)`` for a 2-D ``a`` (M, K) and
    ``b`` either (K, N) or stacked (B, K, N); large products are split along N
    (2-D) or B (3-D) over OpenBLAS's threads, each slice single-threaded."""
    if b.ndim == 2:
        m, k = a.shape
        n = b.shape[1]
        shape = (m, n)
    else:
        m, k = a.shape
        n = b.shape[0] * b.shape[2]
        shape = (b.shape[0], m, b.shape[2])
    threads = _split_threads(a, b, flops=m * n * k)
    axis = 1 if b.ndim == 2 else 0
    if threads == 1 or b.shape[axis] < 2 * threads:
        if m * n * k < settings.current().split_min_flops:
            return _single_threaded(lambda: np.matmul(a, b, out=out))
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty(shape, dtype=np.result_type(a, b))
    jobs = []
    for s, e in _bounds(b.shape[axis], threads):
        if axis == 1:
            jobs.append(lambda s=s, e=e: np.matmul(a, b[:, s:e], out=out[:, s:e]))
        else:
            jobs.append(lambda s=s, e=e: np.matmul(a, b[s:e], out=out[s:e]))
    _run_split(jobs, threads)
    return out


def matmul_nt_sum(a, b):
    """``a @ b.T`` for a (M, L) and b (N, L) with a long shared axis L (a conv's
    weight gradient dY @ col.T): each thread multiplies a slice of L, and the
    partial (M, N) products are summed.  Returns a fresh C-contiguous (M, N)."""
    m, length = a.shape
    n = b.shape[0]
    threads = _split_threads(a, b, flops=m * n * length)
    if threads == 1 or length < 2 * threads:
        if m * n * length < settings.current().split_min_flops:
            return _single_threaded(lambda: np.matmul(a, b.T))
        return np.matmul(a, b.T)
    # each slice as (b_s @ a_s.T).T: OpenBLAS handles this orientation better
    # (measured 10-15% on the cifar10-nv conv shapes)
    parts = _run_split([lambda s=s, e=e: np.matmul(b[:, s:e], a[:, s:e].T)
                        for s, e in _bounds(length, threads)], threads)
    total = parts[0]
    for p in parts[1:]:
        total += p
    return np.ascontiguousarray(total.T)

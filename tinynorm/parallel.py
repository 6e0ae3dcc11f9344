"""Data parallelism across processes, GPUs or machines, on MPI (mpi4py).

``mpirun -np K tinynorm train ...`` starts K ranks; each builds the same model
from the same seed and takes its 1/K of every global batch (rank r: samples
r*B/K ... (r+1)*B/K - 1 of the batch a single process would use).  One step:

1. forward and backward on the rank's chunk (BN statistics are the chunk's own,
   as on each of the paper's 4 GPUs);
2. one reduction (:class:`StepReducer`): the gradients, the float buffers (BN
   running statistics) and the step's scalars (loss, correct predictions, a
   stop flag) are packed into one flat buffer per dtype and summed in buckets
   of ``bucket_bytes`` (one MPI round trip per bucket, not per tensor), then
   divided by K;
3. the SGD step, identical on every rank (same parameters, same averaged
   gradients).

With chunks of equal size the averaged gradient is the gradient of the global
batch's mean loss, and the averaged running statistics are those of one
process with ``bn_chunk = B/K`` (the running update is linear in the batch
statistic): a K-rank run computes what ``bn_chunk = B/K`` computes in one
process, up to the order of the floating-point sums.

NumPy arrays are reduced by MPI; CuPy arrays by NCCL (``cupy.cuda.nccl``), one
rank per GPU, the communicator's id broadcast over MPI.  The NCCL path has
never run on a GPU (the developers' machines have none).

Without a launcher (none of ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``,
``MV2_COMM_WORLD_SIZE``, or srun's ``SLURM_STEP_NUM_TASKS`` in the
environment), or with one rank, :func:`world` is a :class:`SingleProcess` and
mpi4py is not imported.
"""
from __future__ import annotations

import os
import threading
import time
import zlib

import numpy as np

from .backend import get_array_module, to_numpy

__all__ = ["ParallelError", "check_ranks_agree", "ranks_differ", "world", "launched_size", "launched_rank", "SingleProcess", "MPIComm",
           "StepReducer", "together", "state_checksum", "limit_threads", "use_local_gpu",
           "describe"]

# where launchers announce the number of ranks and this process's rank: Open
# MPI's mpirun, MPICH's hydra (and PMI-1/2 launchers), MVAPICH, then Slurm's
# srun.  srun sets SLURM_STEP_NUM_TASKS in each task of its job step; an
# sbatch script itself has only SLURM_NTASKS (the allocation's task count),
# which must not make a single process think it is one of many.  A launcher
# named earlier wins (mpirun inside an allocation starts its daemons with srun).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


class ParallelError(RuntimeError):
    """Ranks that disagree (configuration, parameters) or a rank that failed."""


def _announced(names, default):
    """The first of the environment variables ``names`` that holds an integer."""
    for var in names:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return default


def launched_size() -> int:
    """The number of ranks a launcher (mpirun, srun) announced in the environment (1 if none)."""
    return _announced(_SIZE_VARS, 1)


def launched_rank() -> int:
    """This process's rank as the launcher announced it (0 if none)."""
    return _announced(_RANK_VARS, 0)


class SingleProcess:
    """The communicator of a run without MPI: rank 0 of 1; every collective is the identity."""
    rank, size, local_rank, local_size = 0, 1, 0, 1
    name = "single process"

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def allreduce_sum(self, buf):
        return buf

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)


class MPIComm:
    """MPI.COMM_WORLD through mpi4py, with the rank's place on its node."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.name = f"MPI ({MPI.Get_library_version().splitlines()[0].strip()})"
        self._nccl = None

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allreduce_sum(self, buf):
        """Sum ``buf`` (a contiguous NumPy or CuPy array) over ranks, in place."""
        if isinstance(buf, np.ndarray):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        else:
            self._nccl_comm().allreduce_sum(buf)
        return buf

    def _nccl_comm(self):
        if self._nccl is None:
            self._nccl = _NCCL(self)
        return self._nccl

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


class _NCCL:
    """NCCL all-reduce of CuPy arrays; the unique id travels over MPI.

    Written against ``cupy.cuda.nccl``'s documented API; never run on a GPU."""

    def __init__(self, comm):
        from . import backend
        nccl = backend.nccl()
        if nccl is None:
            raise ParallelError("CuPy arrays across ranks need NCCL (cupy.cuda.nccl), which "
                                "is not usable here: it does not import, or CuPy found no "
                                "libnccl (cupy.cuda.nccl.available is False)")
        self.cupy, self.nccl = backend.cupy, nccl
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.bcast(uid)
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def allreduce_sum(self, buf):
        stream = self.cupy.cuda.get_current_stream()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.types[buf.dtype],
                            self.nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()


_WORLD = None


def world():
    """The communicator of this process: :class:`MPIComm` under an MPI launcher
    with more than one rank, else :class:`SingleProcess` (created once)."""
    global _WORLD
    if _WORLD is None:
        size = launched_size()
        if size > 1:
            try:
                import mpi4py  # noqa: F401
            except ImportError:
                raise ParallelError(
                    f"started by an MPI launcher with {size} ranks, but mpi4py is not "
                    f"installed: pip install 'tinynorm[mpi]'") from None
            comm = MPIComm()
            if comm.size != size:
                raise ParallelError(
                    f"the launcher announced {size} ranks but MPI sees {comm.size}: the MPI "
                    f"library was not started by that launcher (under srun, pick its MPI "
                    f"plugin, e.g. srun --mpi=pmi2 or --mpi=pmix)")
            _WORLD = comm
            limit_threads(_WORLD)
        else:
            _WORLD = SingleProcess()
    return _WORLD


def describe() -> str:
    """One line for ``tinynorm info``: mpi4py, the MPI library, and this process's rank."""
    try:
        import mpi4py
    except ImportError:
        return "MPI: mpi4py not installed (pip install 'tinynorm[mpi]' for data parallelism)"
    try:
        from mpi4py import MPI
        library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    except Exception as e:  # noqa: BLE001 -- an MPI library that fails to load
        return f"MPI: mpi4py {mpi4py.__version__}, but its MPI library fails to load: {e}"
    size = launched_size()
    where = (f"rank {launched_rank()} of {size}" if size > 1
             else "not under an MPI launcher (one process)")
    return f"MPI: mpi4py {mpi4py.__version__}, {library}; {where}"


def limit_threads(comm):
    """Share the node's cores among its ranks: with L ranks on a node of c cores
    each rank's OpenBLAS and numba use c // L threads (at least 1), unless the
    user set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS.  Returns the count, or None."""
    if comm.local_size <= 1 or any(os.environ.get(v) for v in
                                   ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")):
        return None
    threads = max(1, (os.cpu_count() or 1) // comm.local_size)
    from threadpoolctl import threadpool_limits

    from .ops.conv import onednn
    onednn.status()      # load oneDNN's OpenMP runtime first: threadpoolctl limits loaded ones
    threadpool_limits(threads)
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba absent or its threading layer not started: nothing to limit
        pass
    return threads


def use_local_gpu(comm):
    """One rank per GPU: make GPU ``local_rank`` this process's current device.

    ParallelError when the node has fewer GPUs than ranks.  Never run on a GPU."""
    from . import backend
    count = backend.cupy.cuda.runtime.getDeviceCount()
    if comm.local_size > count:
        raise ParallelError(f"{comm.local_size} ranks on this node but {count} GPU(s): "
                            f"start one rank per GPU")
    backend.cupy.cuda.Device(comm.local_rank).use()
    return comm.local_rank


def together(comm, what, fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    Without this a rank that fails before a collective leaves the others
    waiting in it for ever.  The failing rank re-raises its own exception; the
    others raise :class:`ParallelError` naming the rank and its message."""
    try:
        result, failure = fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 -- every failure must reach the other ranks
        result, failure = None, e
    if comm.size == 1:
        if failure is not None:
            raise failure
        return result
    report = None if failure is None else f"{type(failure).__name__}: {failure}"
    reports = comm.allgather(report)
    if failure is not None:
        raise failure
    for rank, message in enumerate(reports):
        if message is not None:
            raise ParallelError(f"rank {rank} failed {what}: {message}")
    return result


def state_checksum(model) -> int:
    """CRC-32 of every parameter's and buffer's bytes, in the model's fixed order."""
    crc = 0
    for name, arr in model.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(to_numpy(arr)).tobytes(), crc)
    return crc


class StepReducer:
    """The once-per-step reduction of a data-parallel run (see the module docstring).

    ``reduce(scalars)`` averages every parameter's gradient and every float
    buffer over the ranks, in place, and returns the *sums* over ranks of the
    given float64 scalars.  The flat buffers are allocated once."""

    def __init__(self, comm, model, bucket_bytes=4 << 20):
        self.comm, self.model = comm, model
        self.bucket_bytes = int(bucket_bytes)
        self.params = [(layer.grads, key, layer.params[key])
                       for _, layer, key in model.named_parameters()]
        self.buffers = [(layer.buffers, key) for _, layer in model.named_layers()
                        for key, buf in layer.buffers.items()
                        if np.dtype(buf.dtype).kind == "f"]
        self._flat = {}                        # dtype -> flat array
        self._groups = self._layout()          # fixed: the containers are read at each step

    def _layout(self):
        """[(dtype, [(container, key, size)])]: the tensors of each flat buffer, in order."""
        groups = {}
        for grads, key, p in self.params:
            groups.setdefault(np.dtype(p.dtype), []).append((grads, key, p.size))
        for buffers, key in self.buffers:
            buf = buffers[key]
            groups.setdefault(np.dtype(buf.dtype), []).append((buffers, key, buf.size))
        return groups

    def reduce(self, scalars):
        size = self.comm.size
        groups = self._groups
        scalars = np.asarray(scalars, np.float64)
        flats = []
        for dtype, members in groups.items():
            total = sum(n for _, _, n in members)
            extra = len(scalars) if dtype == np.float64 else 0
            like = members[0][0][members[0][1]]
            flat = self._flat.get(dtype)
            if flat is None or flat.size != total + extra:
                flat = get_array_module(like).empty(total + extra, dtype)
                self._flat[dtype] = flat
            offset = 0
            for container, key, n in members:
                flat[offset:offset + n] = container[key].reshape(-1)
                offset += n
            if extra:
                flat[offset:] = get_array_module(flat).asarray(scalars)
            flats.append((dtype, members, flat))
        if not any(dtype == np.float64 for dtype, _, _ in flats):
            flat64 = self._flat.setdefault("scalars", np.empty(len(scalars), np.float64))
            flat64[:] = scalars
            flats.append((np.dtype(np.float64), [], flat64))
        for _, _, flat in flats:
            step = max(1, self.bucket_bytes // flat.itemsize)
            for start in range(0, flat.size, step):
                self.comm.allreduce_sum(flat[start:start + step])
        out = None
        for dtype, members, flat in flats:
            offset = 0
            inv = dtype.type(1.0 / size)
            for container, key, n in members:
                target = container[key]
                target[...] = flat[offset:offset + n].reshape(target.shape)
                target *= inv
                offset += n
            if dtype == np.float64:
                out = to_numpy(flat[offset:offset + len(scalars)]).copy()
        return out


ABORT_GRACE_S = 1.0


class Watchdog:
    """Abort every rank when one step's collectives have not returned in ``timeout``
    seconds (a rank that hangs rather than dies; a dead rank is the launcher's to
    clean up).  ``with watchdog.step():`` around the collectives of a step."""

    def __init__(self, comm, timeout):
        self.comm, self.timeout = comm, float(timeout)
        self._since = None
        self._lock = threading.Lock()
        if comm.size > 1 and self.timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="tinynorm-watchdog").start()

    def _watch(self):
        while True:
            time.sleep(min(5.0, self.timeout / 4))
            with self._lock:
                since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                print(f"tinynorm: error: rank {self.comm.rank}: no reply from the other ranks "
                      f"for {self.timeout:.0f} s; aborting all ranks", flush=True)
                # The launcher forwards a rank's output asynchronously and drops what
                # it has not read when an abort tears the job down (MPICH's hydra lost
                # this line in ~1 run of 8): give it time to read the line first.
                time.sleep(ABORT_GRACE_S)
                self.comm.abort(1)

    def __enter__(self):
        with self._lock:
            self._since = time.monotonic()
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._since = None
        return False



def check_ranks_agree(comm, cfg: dict, what: str) -> None:
    """ParallelError on every rank naming the keys in which the ranks' ``cfg`` differ."""
    all_cfgs = comm.allgather(cfg)
    differ = []
    for rank, other in enumerate(all_cfgs):
        for key in sorted(set(other) | set(all_cfgs[0])):
            if other.get(key) != all_cfgs[0].get(key):
                differ.append(f"{key!r} is {all_cfgs[0].get(key)!r} on rank 0 but "
                              f"{other.get(key)!r} on rank {rank}")
    if differ:
        raise ParallelError(f"the ranks were started with different {what}s: "
                            + "; ".join(differ[:5]))


def ranks_differ(comm, model, iteration):
    """None when every rank's parameters and buffers are rank 0's (their checksums
    agree), else a message naming the ranks that differ."""
    sums = comm.allgather(state_checksum(model))
    bad = [r for r, c in enumerate(sums) if c != sums[0]]
    if not bad:
        return None
    return (f"the parameters of rank(s) {', '.join(map(str, bad))} differ from "
            f"rank 0's at iteration {iteration} (checksums "
            f"{', '.join(f'{c:08x}' for c in sums)}); the run stops")

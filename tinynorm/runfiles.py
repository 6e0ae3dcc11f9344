"""A run directory's files: what the log and the checkpoint hold, how they are
written (checksummed, atomic HDF5), read and verified, and the directory's checks.

A run lives in one directory (``config["out"]``):

* ``log.h5``        -- the run log (:func:`read_log`; the README's "Run logs"):
  the full configuration, per-iteration and per-epoch series, output norms, the
  signal and coherence series, the final status (a :class:`RunRecord`).
* ``checkpoint.h5`` -- parameters, buffers, optimizer velocities, the position
  in the data (epoch, batch, iteration), the number of ranks, and the log so far
  under ``log/`` (:func:`write_checkpoint`, :func:`read_checkpoint`).

Writing (:func:`write_h5`).  The file is built in memory first (h5py on a
``BytesIO``), every dataset gets a ``sha256`` attribute (a digest of its dtype,
shape and bytes) and the root an ``attrs_sha256`` digest of every attribute in
the file; then the bytes go to ``NAME.tmp`` with ``os.write``, the file is
fsynced, renamed over ``NAME`` and the directory fsynced.  Building in memory
keeps HDF5 itself away from the disk: on a full disk h5py's own file driver
can crash the process, while a failed ``os.write`` is an ordinary ``OSError``.
A failed write removes the partial ``.tmp`` and leaves the previous file as
it was.

Reading (:func:`read_h5`).  Every dataset is read and checked against its
digest, the attributes against theirs, and the float datasets under the given
groups (a checkpoint's ``model/`` and ``velocity/``) for finiteness; any
failure is a :class:`CheckpointError` naming the dataset.  A file written
before digests existed (no ``attrs_sha256``) is checked for finiteness only.

Run directories: :func:`holds_a_run`, :func:`probe_run_dir` (writable, enough
free space), :func:`lock_run_dir` (one training process per directory),
:func:`remove_stale_tmp`, :func:`clear_run_dir` (for ``overwrite``).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from . import __version__

__all__ = ["CheckpointError", "RunDirError", "write_h5", "read_h5", "remove_stale_tmp",
           "probe_run_dir", "holds_a_run", "clear_run_dir", "lock_run_dir", "RUN_FILES", "prepare_run_dir",
           "LOG", "CHECKPOINT", "SERIES", "RunRecord", "read_log", "write_log",
           "write_checkpoint", "read_checkpoint", "checkpoint_bytes"]

LOG, CHECKPOINT = "log.h5", "checkpoint.h5"
RUN_FILES = (LOG, CHECKPOINT)
DIGEST_ATTR, ATTRS_DIGEST_ATTR = "sha256", "attrs_sha256"


class CheckpointError(ValueError):
    """A checkpoint (or run file) that fails its checks: unreadable, a checksum
    mismatch, non-finite weights.  Never a property of the run itself."""


class RunDirError(OSError):
    """A run directory that cannot be used: it holds another run, or cannot be written."""


# --------------------------------------------------------------------------- digests

def _dataset_digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _plain(value):
    # an attribute value as JSON-able plain Python (numpy scalars, arrays, bytes)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _attrs_digest(f: h5py.File) -> str:
    """One digest of every attribute of every object (except the digests themselves)."""
    items = []

    def collect(name, obj):
        for key, value in obj.attrs.items():
            if key not in (DIGEST_ATTR, ATTRS_DIGEST_ATTR):
                items.append([name, key, _plain(value)])
    collect("/", f)
    f.visititems(collect)
    items.sort(key=lambda item: (item[0], item[1]))
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()


def _datasets(f: h5py.File):
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


# --------------------------------------------------------------------------- writing

def _write_fully(fd: int, data) -> None:
    """os.write until every byte is out (one place for tests to inject ENOSPC/EROFS)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; some file systems refuse fsync on a directory
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_h5(path, fill) -> None:
    """Write the HDF5 file ``path`` atomically: ``fill(f)`` populates an
    in-memory h5py File; digests are added; the bytes are written to
    ``path.tmp``, fsynced and renamed over ``path``.

    Raises ``OSError`` (naming ``path``) when the write fails; then no ``.tmp``
    is left and ``path`` is untouched.
    """
    path = Path(path)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
        for name in _datasets(f):
            f[name].attrs[DIGEST_ATTR] = _dataset_digest(f[name][()])
        f.attrs[ATTRS_DIGEST_ATTR] = _attrs_digest(f)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_fully(fd, buf.getbuffer())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:   # also KeyboardInterrupt: never leave a partial file
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- reading

def read_h5(path, *, finite=(), what="checkpoint"):
    """Read and verify every dataset and attribute of ``path``.

    Returns ``(arrays, attrs)``: ``{dataset path: ndarray}`` and
    ``{object path ("/" for the root): {attr: value}}``.  ``finite`` names the
    top-level groups whose float datasets must be finite.  Raises
    :class:`CheckpointError` for an unreadable file, a dataset that fails its
    checksum (or cannot be read, or has none), attributes that fail theirs, or
    non-finite values; ``FileNotFoundError`` when ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")

    def corrupt(why):
        return CheckpointError(f"{what} {path} is corrupt: {why}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise corrupt(f"not a readable HDF5 file (truncated?): {e}") from None
    with f:
        try:
            checked = ATTRS_DIGEST_ATTR in f.attrs
            if checked and str(f.attrs[ATTRS_DIGEST_ATTR]) != _attrs_digest(f):
                raise corrupt("its attributes (configuration, position, status) fail their "
                              "checksum")
            attrs = {"/": dict(f.attrs)}
            f.visititems(lambda name, obj: attrs.__setitem__(name, dict(obj.attrs)))
            names = _datasets(f)
        except (OSError, RuntimeError, KeyError) as e:
            raise corrupt(f"its structure cannot be read: {e}") from None
        arrays = {}
        for name in names:
            try:
                arr = f[name][()]
            except (OSError, RuntimeError, KeyError, ValueError) as e:
                raise corrupt(f"dataset {name} cannot be read: {e}") from None
            arr = np.asarray(arr)
            if checked:
                digest = attrs[name].get(DIGEST_ATTR)
                if digest is None:
                    raise corrupt(f"dataset {name} has no checksum")
                if str(digest) != _dataset_digest(arr):
                    raise corrupt(f"dataset {name} fails its checksum")
            if name.split("/")[0] in finite and arr.dtype.kind == "f" \
                    and not np.isfinite(arr).all():
                raise corrupt(f"dataset {name} holds non-finite values")
            arrays[name] = arr
    return arrays, attrs


# --------------------------------------------------------------------------- run directories

def prepare_run_dir(out, *, resume=False, overwrite=False) -> None:
    """Before any work: refuse to reuse a directory that holds another run (unless
    resuming it or overwriting it), check that it is writable (creating it)."""
    holds = holds_a_run(out)
    if not resume and holds and not overwrite:
        raise RunDirError(errno.EEXIST, f"run directory {out} already holds a run "
                                        f"({', '.join(holds)}); pass --resume to continue "
                                        f"it or --overwrite to replace it")
    probe_run_dir(out)


def holds_a_run(out) -> list[str]:
    """The run files (log.h5, checkpoint.h5) present in ``out``."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def clear_run_dir(out) -> None:
    """Remove a previous run's files (for ``overwrite``); other files stay."""
    out = Path(out)
    for name in RUN_FILES:
        for p in (out / name, out / (name + ".tmp")):
            if p.exists():
                p.unlink()


def remove_stale_tmp(out) -> list[str]:
    """Remove temporary files a killed writer left behind; return their names."""
    removed = []
    for name in RUN_FILES:
        p = Path(out) / (name + ".tmp")
        if p.exists():
            p.unlink()
            removed.append(p.name)
    return removed


def probe_run_dir(out, need_bytes: int = 0) -> None:
    """Create ``out`` if needed, write, fsync and remove a small probe file, and
    check that at least ``need_bytes`` are free there.  Raises :class:`RunDirError`
    naming the directory and the reason."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tinynorm-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_fully(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise RunDirError(e.errno, f"cannot write to run directory {out}: "
                                   f"{e.strerror or e}") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise RunDirError(errno.ENOSPC, f"not enough free space in run directory {out}: "
                                        f"{free / 2**20:.1f} MiB free, the run needs "
                                        f"{need_bytes / 2**20:.1f} MiB (twice its checkpoint)")


LOCK_FILE = ".tinynorm.lock"


def lock_run_dir(out):
    """Take the run directory's lock (an flock on ``OUT/.tinynorm.lock``) so that two
    processes never train into one directory; return a function that releases it.

    Raises :class:`RunDirError` naming the directory and the holder's pid when
    another process holds it.  The lock goes with the process, so a killed run
    leaves nothing to clean up.  Where flock is missing (Windows) it does nothing.
    """
    try:
        import fcntl
    except ImportError:
        return lambda: None
    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(errno.EBUSY, f"run directory {out} is in use by another process "
                                       f"(pid {holder}); wait for it or use another --out") \
            from None
    try:                       # the holder's pid, for the message above (best effort)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass

    def release():
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return release


# --------------------------------------------------------------------------- the run's files

SERIES = {"iter": ("iteration", "epoch", "loss", "lr", "train_acc"),
          # train_loss/train_acc: means over the epoch's augmented batches in train
          # mode; *_clean: eval mode, no augmentation, a fixed set of training images
          # (the generalization gap is train_top1_clean - test_top1)
          "epoch": ("epoch", "iteration", "train_loss", "train_acc", "test_loss",
                    "test_top1", "test_top5", "seconds", "images_per_s",
                    "train_loss_clean", "train_top1_clean"),
          "norms": ("iteration", "first", "last"),
          # rows of (units,): RMS and mean of every conv unit's / block's output
          "signal": ("iteration", "rms", "mean"),
          # rows of (layers,): the coherence of every conv / linear layer's weights
          "coherence": ("iteration", "value")}


class RunRecord:
    """What a run's log holds besides its configuration: the series (``series``:
    group -> key -> list), the names of the signal and coherence columns, the
    status and why it ended, and the configuration changes made on resume."""

    def __init__(self):
        self.series = {g: {k: [] for k in keys} for g, keys in SERIES.items()}
        self.names = {"signal": [], "coherence": []}
        self.signal_kinds = []
        self.status, self.diverged_at, self.diverged_reason = "running", -1, ""
        self.interrupted_reason = ""           # the signal, or the write that failed
        self.config_changes = []               # [{iteration, key, old, new}]

    def diverge(self, iteration, reason):
        self.status, self.diverged_at, self.diverged_reason = "diverged", iteration, reason

    def write_failed(self, error: OSError, out) -> None:
        """A write into ``out`` failed: the run ends as interrupted, saying why."""
        self.status = "interrupted"
        failure = error.strerror or str(error)
        if not failure.startswith("cannot write"):
            failure = f"cannot write to {out}: {failure}"
        previous = self.interrupted_reason
        if not previous:
            self.interrupted_reason = failure
        elif previous.startswith("SIG"):     # the stop's checkpoint failed: say so first
            self.interrupted_reason = f"{failure} (stopping on {previous})"

    def record_iter(self, it, epoch, loss, lr, acc):
        for key, value in zip(SERIES["iter"], (it, epoch, loss, lr, acc)):
            self.series["iter"][key].append(value)

    def record_norms(self, it, first, last):
        for key, value in zip(SERIES["norms"], (it, first, last)):
            self.series["norms"][key].append(value)

    def record_signal(self, it, names, kinds, rms, mean):
        self.names["signal"], self.signal_kinds = list(names), list(kinds)
        for key, value in zip(SERIES["signal"], (it, rms, mean)):
            self.series["signal"][key].append(value)

    def record_coherence(self, it, names, values):
        self.names["coherence"] = names
        self.series["coherence"]["iteration"].append(it)
        self.series["coherence"]["value"].append(values)

    def record_epoch(self, row):
        for key, value in row.items():
            self.series["epoch"][key].append(value)

    def fill(self, f, *, config, num_parameters, ranks, normalizer):
        """The log's layout: attributes, one group per series, the input normalizer."""
        f.attrs["config"] = json.dumps(config)
        f.attrs["status"] = self.status
        f.attrs["diverged_at"] = self.diverged_at
        f.attrs["diverged_reason"] = self.diverged_reason
        f.attrs["interrupted_reason"] = self.interrupted_reason
        f.attrs["config_changes"] = json.dumps(self.config_changes)
        f.attrs["tinynorm_version"] = __version__
        f.attrs["num_parameters"] = num_parameters
        f.attrs["ranks"] = ranks
        for group, series in self.series.items():
            g = f.create_group(group)
            for key, values in series.items():
                g.create_dataset(key, data=np.asarray(values, np.float64))
            if group in self.names:
                g.attrs["names"] = json.dumps(self.names[group])
            if group == "signal":
                g.attrs["kinds"] = json.dumps(self.signal_kinds)
        norm = f.create_group("normalizer")
        for key, arr in normalizer.items():
            norm.create_dataset(key, data=np.asarray(arr))

    def restore(self, ck):
        """The record a checkpoint read by :func:`read_checkpoint` holds."""
        arrays, log_attrs = ck["arrays"], ck["log_attrs"]
        for name, series in self.series.items():
            for key in series:
                series[key] = list(arrays.get(f"log/{name}/{key}", []))
            # a series this version adds (e.g. the clean training evaluation) is NaN
            # for the rows a checkpoint of an earlier version holds
            rows = max(len(v) for v in series.values())
            for values in series.values():
                values.extend([math.nan] * (rows - len(values)))
            group_attrs = ck["attrs"].get(f"log/{name}", {})
            if name in self.names and "names" in group_attrs:
                self.names[name] = json.loads(group_attrs["names"])
            if name == "signal" and "kinds" in group_attrs:
                self.signal_kinds = json.loads(group_attrs["kinds"])
        self.status = str(log_attrs["status"])
        self.diverged_at = int(log_attrs["diverged_at"])
        self.diverged_reason = str(log_attrs["diverged_reason"])
        self.interrupted_reason = str(log_attrs.get("interrupted_reason", ""))
        self.config_changes = json.loads(log_attrs.get("config_changes", "[]"))


def checkpoint_bytes(model, iterations) -> int:
    """About the size of a checkpoint of ``model`` after ``iterations``: parameters
    and buffers, one velocity per parameter, the log's series, 1 MiB to spare."""
    state = sum(int(a.nbytes) for a in model.state_dict().values())
    velocity = sum(int(a.nbytes) for a in model.parameters().values())
    return state + velocity + 8 * iterations * len(SERIES["iter"]) + (1 << 20)


def write_log(out, record: RunRecord, **meta) -> None:
    """Write ``OUT/log.h5`` atomically (``meta``: see :meth:`RunRecord.fill`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_h5(out / LOG, lambda f: record.fill(f, **meta))


def write_checkpoint(out, record: RunRecord, *, position, state, velocity, **meta) -> None:
    """Write ``OUT/checkpoint.h5`` atomically: the log under ``log/``, the position
    ``(epoch, batch, iteration)``, the model's ``state`` and the optimizer's
    ``velocity`` (host arrays by name)."""
    def fill(f):
        record.fill(f.create_group("log"), **meta)
        f.attrs["epoch"], f.attrs["batch"], f.attrs["iteration"] = position
        f.attrs["ranks"] = meta["ranks"]
        for name, arr in state.items():
            f.create_dataset(f"model/{name}", data=arr)
        for name, arr in velocity.items():
            f.create_dataset(f"velocity/{name}", data=arr)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_h5(out / CHECKPOINT, fill)


def read_checkpoint(path) -> dict:
    """Read and verify a checkpoint (:class:`CheckpointError` when corrupt).

    Returns ``dict(path, arrays, attrs, log_attrs, config, position, ranks,
    model, velocity)``: ``attrs`` every object's attributes by path ("/" the
    root), ``config`` the run's configuration upgraded, completed and checked,
    ``position`` (epoch, batch, iteration), ``model``/``velocity`` the arrays by
    name."""
    from .runconfig import make_config, upgrade_config, validate
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint: {path} does not exist")
    arrays, attrs = read_h5(path, finite=("model", "velocity"))
    try:
        log_attrs, root = attrs["log"], attrs["/"]
        saved = validate(make_config(base=upgrade_config(json.loads(log_attrs["config"]))))
        position = (int(root["epoch"]), int(root["batch"]), int(root["iteration"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a usable tinynorm "
                              f"checkpoint: {e}") from None

    def group(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return dict(path=path, arrays=arrays, attrs=attrs, log_attrs=log_attrs, config=saved,
                position=position, ranks=int(root.get("ranks", 1)), model=group("model/"),
                velocity=group("velocity/"))


def _open_h5(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {e}") \
            from None


def read_log(path) -> dict:
    """Read a run log (a file or a run directory) into plain Python: ``{"config",
    "status", "diverged_at", "diverged_reason", "interrupted_reason",
    "config_changes", "iter": {name: array}, "epoch": {...}, "norms": {...},
    "signal": {...}, "coherence": {...}}``.  Logs of earlier versions read too:
    their configuration as today's keys say it (:func:`tinynorm.runconfig.upgrade_config`)."""
    from .runconfig import upgrade_config
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    with _open_h5(path) as f:
        out = {"config": upgrade_config(json.loads(f.attrs["config"])),
               "status": str(f.attrs["status"]),
               "diverged_at": int(f.attrs["diverged_at"]),
               "diverged_reason": str(f.attrs["diverged_reason"]),
               "interrupted_reason": str(f.attrs.get("interrupted_reason", "")),
               "config_changes": json.loads(f.attrs.get("config_changes", "[]"))}
        for group in SERIES:
            out[group] = {k: f[group][k][()] for k in f[group]} if group in f else {}
            for attr in ("names", "kinds"):
                if group in f and attr in f[group].attrs:
                    out[group][attr] = json.loads(f[group].attrs[attr])
    return out

"""Safe files for a run: checksummed, atomically written HDF5, and run-directory checks.

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
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

__all__ = ["CheckpointError", "RunDirError", "write_h5", "read_h5", "remove_stale_tmp",
           "probe_run_dir", "holds_a_run", "clear_run_dir", "lock_run_dir", "RUN_FILES"]

RUN_FILES = ("log.h5", "checkpoint.h5")
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

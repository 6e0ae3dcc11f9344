"""CIFAR-10, "python version" (Krizhevsky's cifar-10-python.tar.gz).

The archive holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``
(10000 training images each), ``test_batch`` (10000) and ``batches.meta``.  Each
batch is a Python 2 pickle of a dict:

    b"data"      uint8 (10000, 3072): each row 1024 red, 1024 green, 1024 blue
                 values of a 32x32 image, row-major -> reshape to (3, 32, 32)
    b"labels"    list of 10000 ints in [0, 10)
    b"filenames", b"batch_label"   (not used)

``batches.meta`` holds ``b"label_names"`` (10 class names).  tinynorm reads the
extracted folder or the tarball itself (without extracting it).

The pickles are unpickled with a restricted unpickler that only builds plain
containers and NumPy arrays: a pickle asking for anything else is refused.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .base import ArraySplit, Dataset, check_labels, not_found_error, search_dirs

__all__ = ["load_cifar10", "find_cifar10", "read_cifar_batch", "CLASS_NAMES",
           "TRAIN_BATCHES", "TEST_BATCH", "TARBALL", "FOLDER"]

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
HOW_TO_GET = (
    f"To get it: download {TARBALL} (the \"CIFAR-10 python version\", 163 MB) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and put it (or its extracted "
    f"{FOLDER}/ folder) in data/ or data/cifar10/.")

# (module, name) pairs a CIFAR pickle may reference: NumPy's array reconstruction,
# and _codecs.encode, with which Python 3 writes bytes into a protocol-2 pickle.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a CIFAR batch "
                                     "holds only dicts, lists, bytes and NumPy arrays")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... all mean "corrupt"
        raise ValueError(f"{where}: not a readable CIFAR-10 pickle "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles read with encoding="bytes" have bytes keys; accept str too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(data: bytes, where: str):
    """Decode one pickled CIFAR-10 batch.

    Parameters
    ----------
    data : the pickle's bytes
    where : the file (or tarball member) name used in error messages

    Returns
    -------
    images : uint8 (n, 3, 32, 32)
    labels : int64 (n,), checked to lie in [0, 10)
    """
    batch = _unpickle(data, where)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: CIFAR-10 batch without 'data' and 'labels' "
                         f"(keys: {sorted(map(str, batch))})")
    images = np.asarray(batch["data"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: 'data' must be uint8 (n, 3072), got "
                         f"{images.dtype} {images.shape}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}: 'labels' are not integers ({e})") from None
    if labels.shape != (len(images),):
        raise ValueError(f"{where}: {len(images)} images but 'labels' of shape {labels.shape}")
    check_labels(labels, 10, where)
    # (n, 3072) -> (n, 3, 32, 32): the row is channel-major, then row-major pixels
    return images.reshape(-1, 3, 32, 32), labels


def _read_meta(data: bytes, where: str):
    meta = _unpickle(data, where)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise ValueError(f"{where}: 'label_names' must be a list of 10 names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


class _FolderSource:
    def __init__(self, directory: Path):
        self.directory = directory

    def names(self):
        return {p.name for p in self.directory.iterdir() if p.is_file()}

    def read(self, name):
        path = self.directory / name
        return path.read_bytes(), str(path)


class _TarSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            with tarfile.open(path, "r:*") as tar:
                self._members = {}
                for m in tar.getmembers():
                    if m.isfile():
                        self._members[Path(m.name).name] = m.name
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable tar archive ({e})") from None

    def names(self):
        return set(self._members)

    def read_all(self, names):
        """Read several members in one pass over the (gzip-compressed) archive."""
        wanted = {self._members[n]: n for n in names}
        out = {}
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for m in tar:
                    if m.name in wanted:
                        out[wanted[m.name]] = (tar.extractfile(m).read(),
                                               f"{self.path}:{m.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{self.path}: truncated or corrupt archive ({e})") from None
        return out


def find_cifar10(root=None):
    """Where CIFAR-10 is: an extracted ``cifar-10-batches-py/`` folder or the tarball.

    Searched in order: ``root`` (only it, when given); ``$TINYNORM_DATA``;
    ``./data``; the source checkout's ``data/`` -- each directly, in a
    ``cifar10/`` or ``cifar-10/`` subfolder, and in its ``cifar-10-batches-py/``.
    A directory holding the batches wins over a tarball in the same directory.
    ``root`` may also name the tarball itself.

    Returns
    -------
    Path: the batches folder or the tarball
    """
    if root is not None and Path(root).is_file():
        return Path(root)
    searched = search_dirs(root, ["cifar10", "cifar-10"])
    candidates = []
    for directory, why in searched:
        candidates.append((directory / FOLDER, why))
        candidates.append((directory, why))
    for directory, _ in candidates:
        if (directory / TEST_BATCH).is_file() or (directory / "data_batch_1").is_file():
            return directory
        if (directory / TARBALL).is_file():
            return directory / TARBALL
    raise not_found_error("CIFAR-10", candidates, HOW_TO_GET)


def load_cifar10(root=None) -> Dataset:
    """CIFAR-10: train (50000, 3, 32, 32) and test (10000, 3, 32, 32) uint8, int64 labels.

    Reads the official python-version batches from a folder or straight from
    ``cifar-10-python.tar.gz`` (see ``find_cifar10``).  Every batch must be
    present; ``batches.meta`` gives the class names when present.
    """
    location = find_cifar10(root)
    source = _FolderSource(location) if location.is_dir() else _TarSource(location)
    available = source.names()
    needed = TRAIN_BATCHES + [TEST_BATCH]
    missing = [n for n in needed if n not in available]
    if missing:
        raise FileNotFoundError(f"{location}: CIFAR-10 batch(es) missing: {', '.join(missing)}. "
                                + HOW_TO_GET)
    wanted = needed + ([META] if META in available else [])
    if isinstance(source, _TarSource):
        blobs = source.read_all(wanted)
    else:
        blobs = {n: source.read(n) for n in wanted}
    parts = [read_cifar_batch(*blobs[n]) for n in TRAIN_BATCHES]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = read_cifar_batch(*blobs[TEST_BATCH])
    class_names = _read_meta(*blobs[META]) if META in blobs else list(CLASS_NAMES)
    train = ArraySplit(train_images, train_labels, 10, name="cifar10/train")
    test = ArraySplit(test_images, test_labels, 10, name="cifar10/test")
    return Dataset("cifar10", train, test, 10, class_names, source=str(location))

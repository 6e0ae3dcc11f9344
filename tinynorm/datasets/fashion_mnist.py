"""Fashion-MNIST from its four IDX files (gzip-compressed or not).

The IDX format (LeCun's MNIST page; Fashion-MNIST uses it unchanged): a
big-endian header ``00 00 <dtype> <ndim>`` (dtype 0x08 = unsigned byte), then
``ndim`` big-endian uint32 sizes, then the data, row-major.  Images are
``0x00000803`` (N, 28, 28), labels ``0x00000801`` (N,).  Debian's
``dataset-fashion-mnist`` package installs the files under
``/usr/share/datasets/fashion-mnist`` (60000 training, 10000 test images).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from .base import ArraySplit, Dataset, check_labels, not_found_error, search_dirs

__all__ = ["read_idx", "find_fashion_mnist", "load_fashion_mnist", "CLASS_NAMES",
           "DEBIAN_DIR", "FILES"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# split -> (images file, labels file), without the optional ".gz"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs "
    f"the files under {DEBIAN_DIR}), or put the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, from the "
    "zalandoresearch/fashion-mnist repository) in data/fashion-mnist/.")

_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic 1f 8b."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return raw


def read_idx(path, expect_ndim=None):
    """Read one IDX file of unsigned bytes.

    Parameters
    ----------
    path : str or Path; gzip-compressed or plain (detected from the content)
    expect_ndim : int or None; 3 for images, 1 for labels

    Returns
    -------
    uint8 array of the shape the header gives, e.g. (N, 28, 28) or (N,)

    Raises
    ------
    ValueError naming the file: bad magic number, unsupported element type,
    wrong number of dimensions, or a data length that is not exactly the
    product of the sizes (short read or trailing bytes).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                         "(expected 0x00000801 for labels or 0x00000803 for images)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimension(s), expected {expect_ndim} "
                         f"(magic 0x{raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        kind = "short read" if got < expected else "trailing bytes"
        raise ValueError(f"{path}: {kind}: header says {shape} = {expected} bytes of data, "
                         f"file has {got}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[type_code], offset=header).reshape(shape)


def _find_file(directory: Path, stem: str):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz",
                 stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root=None):
    """The directory holding the four Fashion-MNIST files, and their paths.

    Searched in order: ``root`` (only it, when given); ``$TINYNORM_DATA``;
    ``./data``; the source checkout's ``data/`` (each also with a
    ``fashion-mnist/`` subfolder); Debian's ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    (Path, dict): the directory and ``{split: (images path, labels path)}``

    Raises
    ------
    DataNotFoundError listing the directories searched and how to get the data;
    FileNotFoundError when a directory holds some of the files but not all.
    """
    searched = search_dirs(root, ["fashion-mnist", "fashion_mnist"], extra=[DEBIAN_DIR])
    for directory, _ in searched:
        found = {stem: _find_file(directory, stem)
                 for pair in FILES.values() for stem in pair}
        present = [s for s, p in found.items() if p is not None]
        if not present:
            continue
        missing = [s for s, p in found.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"{directory} holds part of Fashion-MNIST but is missing "
                f"{', '.join(m + '[.gz]' for m in missing)}. {HOW_TO_GET}")
        return directory, {split: (found[i], found[l]) for split, (i, l) in FILES.items()}
    raise not_found_error("Fashion-MNIST", searched, HOW_TO_GET)


def _load_split(images_path, labels_path, split):
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} "
                         f"has {len(labels)} labels")
    check_labels(labels, 10, str(labels_path))
    # (N, 28, 28) -> (N, 1, 28, 28): NCHW with one grey channel
    return ArraySplit(images[:, None, :, :], labels.astype(np.int64), 10,
                      name=f"fashion-mnist/{split}")


def load_fashion_mnist(root=None) -> Dataset:
    """Fashion-MNIST: train (N, 1, 28, 28) uint8 images and int64 labels in [0, 10); test likewise.

    The real files hold 60000 training and 10000 test images.  See
    ``find_fashion_mnist`` for where the files are looked for.
    """
    directory, files = find_fashion_mnist(root)
    train = _load_split(*files["train"], "train")
    test = _load_split(*files["test"], "test")
    return Dataset("fashion-mnist", train, test, 10, list(CLASS_NAMES), source=str(directory))

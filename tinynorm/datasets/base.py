"""The common shape of every data set: ``Dataset`` with ``train``/``test`` splits.

A split is anything with ``len(split)`` and ``split.get_batch(indices)``
returning ``(images, labels)``:

    images  uint8  (B, C, H, W)   NCHW, raw pixel values 0..255
    labels  int64  (B,)           class indices in [0, num_classes)

``ArraySplit`` holds both arrays in memory (Fashion-MNIST, CIFAR-10);
``tinynorm.datasets.imagenet.H5Split`` reads them lazily from HDF5 shards;
``SubsetSplit`` is a view of a fixed subset of another split.  ``split[idx]``
is ``get_batch`` for an index array or slice, and ``(image, label)`` for an int.

This module also holds where tinynorm looks for data (``search_dirs``) and the
error raised when a data set is nowhere to be found (``DataNotFoundError``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ENV_VAR", "DataNotFoundError", "search_dirs", "not_found_error",
    "Split", "ArraySplit", "SubsetSplit", "Dataset", "subset", "check_labels",
]

# A data root for every data set: $TINYNORM_DATA/<data set folder>.
ENV_VAR = "TINYNORM_DATA"

# The source checkout's data/ folder (tinynorm/datasets/base.py -> repo/data).
_REPO_DATA = Path(__file__).resolve().parents[2] / "data"


class DataNotFoundError(FileNotFoundError):
    """A data set is missing; the message lists the paths searched and how to get it."""


def search_dirs(root, subdirs, extra=()):
    """The directories to search for one data set, in priority order.

    Parameters
    ----------
    root : str or Path or None
        A directory given by the caller.  When given, it is the *only* place
        searched (``root`` itself and ``root/<subdir>``): an explicit path that
        holds no data is an error, not a reason to read other data silently.
    subdirs : sequence of str
        Folder names the data set may sit in below a data root
        (e.g. ``["fashion-mnist"]``).
    extra : sequence of str or Path
        System locations searched last (e.g. Debian's
        ``/usr/share/datasets/fashion-mnist``).

    Returns
    -------
    list of (Path, str)
        ``(directory, why it is searched)`` pairs, without duplicates.  Order:
        ``root``; ``$TINYNORM_DATA``; ``./data``; the source checkout's
        ``data/``; then ``extra``.
    """
    bases = []
    if root is not None:
        bases.append((Path(root).expanduser(), "root argument"))
    else:
        env = os.environ.get(ENV_VAR)
        if env:
            bases.append((Path(env).expanduser(), f"${ENV_VAR}"))
        bases.append((Path.cwd() / "data", "./data"))
        bases.append((_REPO_DATA, "tinynorm source checkout's data/"))
    out, seen = [], set()

    def add(path, why):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.append((Path(path), why))

    for base, why in bases:
        for sub in subdirs:
            add(base / sub, why)
        add(base, why)
    if root is None:
        for path in extra:
            add(Path(path), "system location")
    return out


def not_found_error(what, searched, how_to_get):
    """A ``DataNotFoundError`` naming every directory searched and how to get the data."""
    lines = [f"{what} not found. Searched, in this order:"]
    lines += [f"  {path}  ({why})" for path, why in searched]
    lines.append(how_to_get)
    lines.append(f"A data root can also be given with root=... or ${ENV_VAR}; "
                 "see data/README.md.")
    return DataNotFoundError("\n".join(lines))


def _as_index_array(idx, n):
    """An int64 index array for a slice, list or array; negative indices wrap; bounds checked."""
    if isinstance(idx, slice):
        return np.arange(n, dtype=np.int64)[idx]
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean index of shape {arr.shape} for a split of length {n}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise IndexError(f"expected a 1-d integer index array, got dtype {arr.dtype} "
                         f"shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"index out of range for a split of length {n}")
    return np.where(arr < 0, arr + n, arr)


class Split:
    """A set of labelled images, read in batches.

    Subclasses implement ``__len__`` and ``_get(indices)``, and set
    ``num_classes`` (int), ``image_shape`` ((C, H, W)) and ``name`` (str).
    """

    num_classes: int
    image_shape: tuple
    name: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get(self, indices):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_batch(self, indices):
        """Images and labels at ``indices``.

        Parameters
        ----------
        indices : int array (B,), a list, a boolean mask (N,) or a slice

        Returns
        -------
        images : uint8 (B, C, H, W)
        labels : int64 (B,)
        """
        return self._get(_as_index_array(indices, len(self)))

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            images, labels = self.get_batch(np.array([idx]))
            return images[0], int(labels[0])
        return self.get_batch(idx)

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, n={len(self)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


class ArraySplit(Split):
    """A split held in memory.

    Parameters
    ----------
    images : uint8 (N, C, H, W)
    labels : int64 (N,), every value in [0, num_classes)
    num_classes : int
    name : str, e.g. ``"fashion-mnist/train"``
    """

    def __init__(self, images, labels, num_classes, name=""):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images must be uint8 (N, C, H, W), got "
                             f"{images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
        check_labels(labels, num_classes, name)
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.num_classes = int(num_classes)
        self.image_shape = tuple(images.shape[1:])
        self.name = name

    def __len__(self):
        return len(self.labels)

    def _get(self, indices):
        return self.images[indices], self.labels[indices]


class SubsetSplit(Split):
    """A fixed subset of another split (nothing is copied until read).

    Parameters
    ----------
    parent : Split
    indices : int64 (n,), indices into ``parent``
    """

    def __init__(self, parent, indices, name=None):
        self.parent = parent
        self.indices = _as_index_array(indices, len(parent))
        self.num_classes = parent.num_classes
        self.image_shape = parent.image_shape
        self.name = name if name is not None else f"{parent.name}[subset {len(self.indices)}]"

    def __len__(self):
        return len(self.indices)

    @property
    def labels(self):
        """int64 (n,): the subset's labels (read from the parent)."""
        parent_labels = getattr(self.parent, "labels", None)
        if parent_labels is not None:
            return np.asarray(parent_labels)[self.indices]
        return self.parent.get_batch(self.indices)[1]

    def _get(self, indices):
        return self.parent.get_batch(self.indices[indices])


def check_labels(labels, num_classes, where):
    """Raise ``ValueError`` naming ``where`` when a label is outside [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        raise ValueError(f"{where}: {bad} label(s) outside [0, {num_classes}) "
                         f"(min {lo}, max {hi})")


def subset(split, n, seed=0):
    """A random subset of ``n`` samples of ``split`` (e.g. 10k images for a cpu preset).

    Sampling is without replacement, seeded, and the chosen indices are kept in
    increasing order (so a subset of an HDF5 split reads shards in order).  An
    ``ArraySplit`` gives an ``ArraySplit`` (the arrays are copied); any other
    split gives a ``SubsetSplit`` view.  ``n >= len(split)`` returns ``split``.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n >= len(split):
        return split
    indices = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    name = f"{split.name}[{n} of {len(split)}, seed {seed}]"
    if isinstance(split, ArraySplit):
        return ArraySplit(split.images[indices], split.labels[indices], split.num_classes, name)
    return SubsetSplit(split, indices, name)


@dataclass
class Dataset:
    """A data set: a training and a test split and what the labels mean.

    Attributes
    ----------
    name : str            ``"fashion-mnist"``, ``"cifar10"`` or ``"imagenet"``
    train, test : Split
    num_classes : int
    class_names : list of str, or None when unknown
    source : str          the file or directory the data was read from
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: list | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
                f"image_shape={self.train.image_shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")

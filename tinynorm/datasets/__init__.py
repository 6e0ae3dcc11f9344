"""Data sets, augmentation and batching.

    from tinynorm.datasets import (load_dataset, subset, PixelNormalizer,
                                   CifarAugment, BatchIterator)

    ds = load_dataset("fashion-mnist")            # or "cifar10", "imagenet"
    train = subset(ds.train, 10_000, seed=0)      # a cpu preset's 10k images
    norm = PixelNormalizer.fit(train.images)      # per-pixel mean/std, (C, H, W)
    aug = CifarAugment(norm, crop=28, pad=2, train=True)
    # or: aug, test_aug, norm = make_transforms("fashion-mnist", train, pad=2)
    for x, y in BatchIterator(train, 128, aug, rng_seed=0).epoch(3):
        ...                                       # x float32 (128, 1, 28, 28), y int64 (128,)

Every split has ``len()`` and ``get_batch(indices) -> (uint8 (B, C, H, W),
int64 (B,))``; in-memory splits also expose ``.images`` and ``.labels``.
Where each data set comes from and where tinynorm looks for it:
``data/README.md``.
"""
from __future__ import annotations

from .augment import (CifarAugment, ImageNetAugment, Normalize, PixelNormalizer,
                      crop_batch, flip_batch, make_transforms)
from .base import (ENV_VAR, ArraySplit, DataNotFoundError, Dataset, Split, SubsetSplit,
                   subset)
from .cifar10 import load_cifar10
from .fashion_mnist import load_fashion_mnist, read_idx
from .imagenet import H5Split, load_imagenet, prepare_imagenet, verify_imagenet
from .loader import BatchIterator

__all__ = [
    "load_dataset", "DATASETS", "Dataset", "Split", "ArraySplit", "SubsetSplit", "H5Split",
    "subset", "DataNotFoundError", "ENV_VAR",
    "load_fashion_mnist", "load_cifar10", "load_imagenet", "prepare_imagenet",
    "verify_imagenet", "read_idx",
    "PixelNormalizer", "Normalize", "CifarAugment", "ImageNetAugment", "make_transforms",
    "crop_batch", "flip_batch", "BatchIterator",
]

DATASETS = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagenet": load_imagenet,
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "ilsvrc2012": "imagenet"}


def load_dataset(name, root=None, **options) -> Dataset:
    """Load a data set by name: ``"fashion-mnist"``, ``"cifar10"`` or ``"imagenet"``.

    ``root`` is a directory to read from (the only place searched when
    given); otherwise ``$TINYNORM_DATA``, ``./data``, the source checkout's
    ``data/`` and, for Fashion-MNIST, Debian's
    ``/usr/share/datasets/fashion-mnist`` are searched in that order.

    Returns a ``Dataset`` whose ``train``/``test`` splits yield uint8 NCHW
    images and int64 labels.  Raises ``DataNotFoundError`` (a
    ``FileNotFoundError``) listing the paths searched when the data is
    missing, ``ValueError`` naming the file when a file is corrupt.
    ``options`` go to the data set's loader (ImageNet: ``verify=True``
    re-hashes every shard).
    """
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[key](root, **options)

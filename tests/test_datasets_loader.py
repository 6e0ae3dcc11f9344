"""Splits, subsets, load_dataset's dispatch and the seeded BatchIterator."""
import threading

import numpy as np
import pytest

from tinynorm.datasets import (ArraySplit, BatchIterator, CifarAugment, PixelNormalizer,
                               SubsetSplit, load_dataset, subset)


def make_split(n=50, seed=0, num_classes=5):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    # image i carries its own index in pixel (0, 0, 0) so batches can be traced
    images[:, 0, 0, 0] = np.arange(n) % 256
    labels = rng.integers(0, num_classes, n)
    return ArraySplit(images, labels, num_classes, name="toy/train")


def epoch_arrays(iterator, epoch):
    return [(x.copy(), y.copy()) for x, y in iterator.epoch(epoch)]


def assert_same(run_a, run_b):
    assert len(run_a) == len(run_b)
    for (xa, ya), (xb, yb) in zip(run_a, run_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_array_split_indexing_and_validation():
    split = make_split(10)
    images, labels = split.get_batch([3, 1, -1])
    np.testing.assert_array_equal(images[:, 0, 0, 0], [3, 1, 9])
    assert labels.dtype == np.int64
    image, label = split[4]
    assert image.shape == (1, 8, 8) and label == split.labels[4]
    np.testing.assert_array_equal(split[2:5][0][:, 0, 0, 0], [2, 3, 4])
    with pytest.raises(IndexError):
        split.get_batch([10])
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        ArraySplit(split.images, np.array([0] * 9 + [5]), 5, "bad")
    with pytest.raises(ValueError, match="uint8"):
        ArraySplit(split.images.astype(np.float32), split.labels, 5)
    with pytest.raises(ValueError, match="10 images but labels"):
        ArraySplit(split.images, split.labels[:9], 5)


def test_subset_is_seeded_sorted_and_sized():
    split = make_split(100)
    a, b, c = subset(split, 30, seed=1), subset(split, 30, seed=1), subset(split, 30, seed=2)
    assert isinstance(a, ArraySplit) and len(a) == 30 and a.num_classes == 5
    picked = a.images[:, 0, 0, 0].astype(int)
    assert np.all(np.diff(picked) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(a.labels, split.labels[picked])
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert subset(split, 1000) is split
    view = SubsetSplit(split, [5, 7, 9])
    assert len(view) == 3 and subset(view, 2, seed=0).__class__ is SubsetSplit
    np.testing.assert_array_equal(view.get_batch([2, 0])[0][:, 0, 0, 0], [9, 5])
    np.testing.assert_array_equal(view.labels, split.labels[[5, 7, 9]])


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("mnist")


def test_epoch_covers_split_once_and_batches_are_shaped():
    split = make_split(50)
    it = BatchIterator(split, 16, rng_seed=3, drop_last=False, prefetch=False)
    assert len(it) == 4
    batches = list(it.epoch(0))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
    seen = np.concatenate([np.rint(x[:, 0, 0, 0] * 255).astype(int) for x, _ in batches])
    assert sorted(seen) == list(range(50))
    assert seen.tolist() != list(range(50))  # shuffled
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, split.labels[seen])
    assert len(BatchIterator(split, 16)) == 3  # drop_last
    unshuffled = BatchIterator(split, 10, shuffle=False, prefetch=False)
    np.testing.assert_array_equal(next(iter(unshuffled))[1], split.labels[:10])


def test_seeded_epochs_resume_and_prefetch_match():
    split = make_split(64)
    aug = CifarAugment(PixelNormalizer.fit(split.images), crop=6, pad=1, train=True)
    it = BatchIterator(split, 8, aug, rng_seed=11, prefetch=True)
    uninterrupted = [[(x.copy(), y.copy()) for x, y in it] for _ in range(3)]  # epochs 0, 1, 2
    assert uninterrupted[0][0][0].shape == (8, 1, 6, 6)
    assert not np.array_equal(uninterrupted[0][0][1], uninterrupted[1][0][1])
    # a fresh iterator resumed at epoch 2, without prefetch: identical batches
    resumed = BatchIterator(split, 8, aug, rng_seed=11, prefetch=False)
    resumed.set_epoch(2)
    assert_same(list(resumed), uninterrupted[2])
    assert_same(epoch_arrays(resumed, 1), uninterrupted[1])
    other_seed = BatchIterator(split, 8, aug, rng_seed=12)
    assert not np.array_equal(epoch_arrays(other_seed, 0)[0][0], uninterrupted[0][0][0])


def test_prefetch_thread_stops_on_early_break_and_forwards_errors():
    split = make_split(64)
    before = threading.active_count()
    it = BatchIterator(split, 4, rng_seed=0, prefetch=True)
    gen = it.epoch(0)
    next(gen)
    next(gen)
    gen.close()  # what `break` does to a for loop's generator
    assert threading.active_count() == before

    calls = []

    def failing(images, rng):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("transform failed on batch 2")
        return images.astype(np.float32)

    it = BatchIterator(split, 4, failing, prefetch=True)
    got = []
    with pytest.raises(RuntimeError, match="batch 2"):
        for x, _ in it.epoch(0):
            got.append(x)
    assert len(got) == 2 and threading.active_count() == before


def test_batch_iterator_rejects_empty_epochs():
    with pytest.raises(ValueError, match="no batch"):
        BatchIterator(make_split(5), 8)

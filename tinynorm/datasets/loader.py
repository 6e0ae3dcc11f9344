"""Seeded, shuffled mini-batches, optionally prepared one batch ahead in a thread.

Reproducibility contract: the batches of epoch ``e`` depend only on
``(rng_seed, e)``, the split, the batch size and the transform -- not on how
many epochs ran before in this process, nor on prefetching.  Two streams are
derived from ``rng_seed`` with ``numpy.random.SeedSequence`` spawn keys:

    order of epoch e               SeedSequence(rng_seed, spawn_key=(0, e))
    augmentation of batch b of e   SeedSequence(rng_seed, spawn_key=(1, e, b))

so a run resumed from a checkpoint at the start of epoch ``e``
(``it.set_epoch(e)`` or ``it.epoch(e)``) sees exactly the images, order and
augmentation an uninterrupted run would have.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

__all__ = ["BatchIterator", "epoch_order", "batch_rng", "prefetched"]

_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def epoch_order(n, rng_seed, epoch, shuffle=True):
    """int64 (n,): the sample order of one epoch (a seeded permutation, or 0..n-1)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    seq = np.random.SeedSequence(rng_seed, spawn_key=(_ORDER_STREAM, epoch))
    return np.random.Generator(np.random.PCG64(seq)).permutation(n).astype(np.int64)


def batch_rng(rng_seed, epoch, batch):
    """The numpy Generator that augments batch ``batch`` of epoch ``epoch``."""
    seq = np.random.SeedSequence(rng_seed, spawn_key=(_AUGMENT_STREAM, epoch, batch))
    return np.random.Generator(np.random.PCG64(seq))


def _default_transform(images, rng):
    """uint8 (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    return images.astype(np.float32) * np.float32(1 / 255)


def prefetched(make, items, name="prefetch"):
    """A generator of ``make(i)`` for every ``i`` of ``items``, in order, made one
    ahead by a worker thread.

    The worker hands each result over through a queue of size 1: it works on
    item i+1 while the caller uses item i.  NumPy releases the GIL in its copy
    and arithmetic kernels, so the two overlap.  An exception in ``make`` is
    re-raised in the caller; the generator's ``finally`` stops the worker when
    the caller breaks out early or the generator is closed or collected.
    """
    items = list(items)
    handoff = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for i in items:
                if stop.is_set() or not put(("item", make(i))):
                    return
        except BaseException as e:  # handed to the caller, re-raised there
            put(("error", e))

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        for _ in items:
            kind, item = handoff.get()
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


class BatchIterator:
    """Mini-batches of one split, one epoch per iteration.

    Parameters
    ----------
    split : a Split (``len`` and ``get_batch(indices) -> (uint8 images, int64 labels)``)
    batch_size : int
    transform : callable ``(uint8 (B, C, H, W), numpy Generator) -> float32 (B, C, h, w)``,
        e.g. ``CifarAugment``; ``None`` scales pixel values to [0, 1]
    rng_seed : int, the seed of the epoch orders and augmentations
    shuffle : bool, a new seeded permutation every epoch (else the split's order)
    drop_last : bool, drop the last incomplete batch (else yield it, smaller)
    prefetch : bool, prepare the next batch in a background thread while the
        caller works on the current one (same results as without)

    Yields
    ------
    x : float32 (B, C, h, w), C-contiguous
    y : int64 (B,)

    Use ``for x, y in it.epoch(e)`` for an explicit epoch, or ``for x, y in it``
    which runs epoch 0, then 1, ... (``set_epoch(e)`` sets the next one, e.g.
    after resuming from a checkpoint).
    """

    def __init__(self, split, batch_size, transform=None, rng_seed=0, shuffle=True,
                 drop_last=True, prefetch=True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = int(batch_size)
        self.transform = transform if transform is not None else _default_transform
        self.rng_seed = int(rng_seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.prefetch = bool(prefetch)
        self._next_epoch = 0
        if len(self) == 0:
            raise ValueError(f"{len(split)} samples make no batch of {batch_size} "
                             "with drop_last=True")

    def __len__(self):
        """Batches per epoch."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        """The epoch the next ``iter(self)`` runs."""
        self._next_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch(epoch)

    def order(self, epoch):
        """int64 (len(split),): the sample indices of ``epoch`` in the order they are served."""
        return epoch_order(len(self.split), self.rng_seed, epoch, self.shuffle)

    def make_batch(self, epoch, batch, order=None):
        """Batch ``batch`` of ``epoch``: (x float32 (B, C, h, w), y int64 (B,))."""
        if order is None:
            order = self.order(epoch)
        indices = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        images, labels = self.split.get_batch(indices)
        x = self.transform(images, batch_rng(self.rng_seed, epoch, batch))
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x, np.asarray(labels, dtype=np.int64)

    def epoch(self, epoch, start=0, prefetch=None):
        """A generator over the batches ``start, start+1, ...`` of ``epoch``;
        ``prefetch`` None: the iterator's setting."""
        epoch, start = int(epoch), int(start)
        order = self.order(epoch)
        num_batches = len(self)
        prefetch = self.prefetch if prefetch is None else bool(prefetch)
        if prefetch and num_batches - start > 1:
            return self._prefetched(epoch, order, num_batches, start)
        return (self.make_batch(epoch, b, order) for b in range(start, num_batches))

    def _prefetched(self, epoch, order, num_batches, start=0):
        return prefetched(lambda b: self.make_batch(epoch, b, order), range(start, num_batches),
                          name=f"BatchIterator-epoch{epoch}")

    def __repr__(self):
        return (f"BatchIterator({self.split!r}, batch_size={self.batch_size}, "
                f"transform={self.transform!r}, rng_seed={self.rng_seed}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last}, prefetch={self.prefetch})")

"""A run's data: the training and test splits, the per-pixel normalizer, the
batch schedule (a pure function of seed, epoch and batch index), each rank's
part of it, and the evaluation of a model on it (:func:`evaluate`)."""
from __future__ import annotations

import numpy as np

from . import backend, ops
from .backend import to_numpy

__all__ = ["RunData", "evaluate", "topk_correct"]


class RunData:
    """Training/test splits, the per-pixel normalizer and the batch schedule.

    ``part = (rank, ranks)``: this rank's chunk of every global batch (rows
    rank*B/ranks ... of the batch one process would use) and its contiguous
    shard of the test set."""

    def __init__(self, cfg, part=(0, 1), dataset=None):
        from . import datasets
        # dataset: an in-memory tinynorm.datasets.Dataset (tests); else loaded by name
        ds = dataset if dataset is not None else datasets.load_dataset(cfg["dataset"],
                                                                       cfg["data_root"])
        self.num_classes = ds.num_classes
        self.train, self.test = ds.train, ds.test
        if cfg["train_limit"]:
            self.train = datasets.subset(self.train, int(cfg["train_limit"]), cfg["seed"])
        if cfg["test_limit"]:
            self.test = datasets.subset(self.test, int(cfg["test_limit"]), cfg["seed"])
        self.in_channels = self.train.images.shape[1] if hasattr(self.train, "images") \
            else self.train.get_batch(np.arange(1))[0].shape[1]
        self.transform_train, self.transform_test, self.normalizer = \
            datasets.make_transforms(cfg["dataset"], self.train, augment=cfg["augment"],
                                     crop=cfg["crop"], pad=cfg["pad"], flip=cfg["flip"],
                                     min_std=cfg["min_std"])
        if len(self.test) == 0:
            raise ValueError(f"the test set of {cfg['dataset']} is empty: nothing to evaluate on")
        if len(self.train) < cfg["batch_size"]:
            raise ValueError(f"the training set has {len(self.train)} images, fewer than one "
                             f"batch of {cfg['batch_size']}")
        # the order of an epoch and the augmentation of each batch are pure
        # functions of (seed, epoch, batch): resuming mid-epoch is exact
        self.batches = datasets.BatchIterator(self.train, cfg["batch_size"], self.transform_train,
                                              rng_seed=cfg["seed"], shuffle=True, drop_last=True,
                                              prefetch=False)
        self.batches_per_epoch = len(self.batches)
        self._order = (None, None)
        self.dtype = np.dtype(cfg["dtype"])
        self.rank, self.ranks = part
        # the clean training evaluation's images: the whole training subset when it
        # holds at most clean_eval_size, else a fixed seeded subset of that size
        n_clean = cfg["clean_eval_size"]
        self.train_clean = None
        if n_clean:
            self.train_clean = self.train if len(self.train) <= n_clean else \
                datasets.subset(self.train, n_clean, cfg["seed"])
        self.test_shard, self.clean_shard = self.test, self.train_clean
        if self.ranks > 1:
            def shard_of(split):
                rows = np.array_split(np.arange(len(split)), self.ranks)[self.rank]
                return datasets.SubsetSplit(split, rows, f"{split.name}[rank {self.rank}]")
            self.test_shard = shard_of(self.test)
            if self.train_clean is not None:
                self.clean_shard = shard_of(self.train_clean)

    def train_batch(self, epoch, b, whole=False):
        """Batch ``b`` of ``epoch``: this rank's chunk of it (all of it when ``whole``)."""
        if self._order[0] != epoch:
            self._order = (epoch, self.batches.order(epoch))
        # the whole batch is assembled on every rank, so that its augmentation
        # (drawn per batch, for all of its samples) is the single-process one
        x, y = self.batches.make_batch(epoch, b, self._order[1])
        if self.ranks > 1 and not whole:
            n = len(y) // self.ranks
            x, y = x[self.rank * n:(self.rank + 1) * n], y[self.rank * n:(self.rank + 1) * n]
        return x.astype(self.dtype, copy=False), y

    def train_batches(self, epoch, start, device):
        """The batches ``start, start+1, ...`` of ``epoch``, on ``device``.

        CPU: made on demand, one by one (exactly :meth:`train_batch`).  GPU: a
        worker thread makes the host batches one ahead and each is staged onto
        the device one step ahead (pinned buffers, a copy stream), so the data
        preparation and the copy overlap the step; the batches are the same
        (a pure function of seed, epoch and index)."""
        if device == "cpu":
            for b in range(start, self.batches_per_epoch):
                yield self.train_batch(epoch, b)
            return
        from .datasets.loader import prefetched
        # train_batch in the worker: the one definition of a batch (the worker is
        # its only caller while the epoch runs)
        host = prefetched(lambda b: self.train_batch(epoch, b),
                          range(start, self.batches_per_epoch), name=f"train-epoch{epoch}")
        stager = backend.HostToDevice(device)
        pending = None
        try:
            for x, y in host:
                staged = stager.stage((x, y))      # its copy runs while `pending` is used
                if pending is not None:
                    yield pending.get()
                pending = staged
            if pending is not None:
                yield pending.get()
        finally:
            host.close()                           # stops the worker on an early break

    def test_batches(self, batch_size, split=None):
        """This rank's shard of the test set (or of ``split``), in batches, with the
        test-time transform (no augmentation)."""
        from .datasets import BatchIterator
        split = self.test_shard if split is None else split
        batches = BatchIterator(split, batch_size, self.transform_test, shuffle=False,
                                drop_last=False, prefetch=False).epoch(0)
        return ((x.astype(self.dtype, copy=False), y) for x, y in batches)

    def clean_train_batches(self, batch_size):
        """This rank's shard of the clean-evaluation training images, transformed as
        test images are; None when ``clean_eval_size`` is 0."""
        if self.clean_shard is None:
            return None
        return self.test_batches(batch_size, self.clean_shard)

    def normalizer_arrays(self):
        if self.normalizer is None:
            return {}
        return {"mean": self.normalizer.mean, "std": self.normalizer.std}


def topk_correct(logits, labels, k):
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(model, batches, comm=None):
    """Mean loss, top-1 and top-5 accuracy (in %) of ``model`` in eval mode;
    host batches go to the model's device.

    With a communicator of several ranks, ``batches`` is this rank's shard and
    the sums are reduced over the ranks (every rank returns the totals)."""
    was_training = model.training
    model.eval()
    device = model.device
    n = loss_sum = top1 = top5 = 0
    try:
        for x, y in batches:
            y = to_numpy(y)
            logits = model.forward(backend.to_device(x, device))
            loss, _ = ops.softmax_cross_entropy(logits, y)
            logits = to_numpy(logits)
            loss_sum += float(loss) * len(y)
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5)
            n += len(y)
    finally:
        model.train(was_training)
    if comm is not None and comm.size > 1:
        n, loss_sum, top1, top5 = comm.allreduce_sum(
            np.array([n, loss_sum, top1, top5], np.float64))
    return loss_sum / n, 100.0 * top1 / n, 100.0 * top5 / n


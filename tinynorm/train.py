"""The training loop: metrics, divergence detection, checkpoints, HDF5 logs.

A run lives in one directory (``config["out"]``):

* ``log.h5``        -- the run log (see :func:`read_log` and the README's
  "Run logs" section): the full configuration, per-iteration and per-epoch
  series, output norms, the final status.  Rewritten atomically at every
  epoch end and whenever the run stops.
* ``checkpoint.h5`` -- parameters, buffers, optimizer velocities, the position
  in the data (epoch, batch) and the log series so far; written atomically
  at every epoch end and on SIGINT (Ctrl-C), SIGTERM or SIGHUP.  Every
  dataset carries a checksum, verified on load (see ``tinynorm.checkpoint``).
  ``resume=True`` continues from it with the checkpoint's configuration and,
  on the CPU, single-threaded and for a fixed seed, gives exactly the numbers
  of an uninterrupted run (the data order and augmentation of every batch are
  a pure function of (seed, epoch, batch index); with several threads the
  float32 results can differ between processes in the last digits).

A directory that holds a run (log.h5 or checkpoint.h5) is never silently
reused: a new run there needs ``overwrite=True``.  On resume only the keys of
``tinynorm.runconfig.RESUME_ALLOWED`` may change; each change is recorded in the
log (``config_changes``) with the iteration from which it applies.  Every
configuration value is checked (``tinynorm.runconfig``) before any data loads.
A checkpoint or log that cannot be written (full disk, read-only file system)
ends the run as ``interrupted`` with the reason; the previous checkpoint stays.

``device`` ("cpu", the default, or "gpu") is where the model, the optimizer
state and the batches live: the model is built on the host (the same seeded
init on every device) and moved as a whole; on the GPU each training batch is
prepared by a worker thread and copied ahead of its step
(:class:`tinynorm.backend.HostToDevice`); checkpoints are written from the
device and restored onto the device of the run that loads them.

Divergence is a result, not a crash: a non-finite loss, a loss above
``diverge_loss`` or non-finite weights end the run with status ``diverged``
and the iteration at which it happened.
"""
from __future__ import annotations

import errno
import json
import math
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from . import __version__, backend, ops
from . import checkpoint as run_files
from . import parallel
from . import runconfig as config_checks
from .runconfig import DEFAULTS, make_config, unit_options, upgrade_config
from .backend import to_numpy
from .diagnostics import SignalRecorder, weight_coherences
from .models import build_model
from .optim import SGD, LRSchedule
from .progress import EpochProgress

__all__ = ["DEFAULTS", "Trainer", "read_log", "evaluate", "make_config", "upgrade_config"]

# --------------------------------------------------------------------------- data

class _Data:
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


def _topk_correct(logits, labels, k):
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
            top1 += _topk_correct(logits, y, 1)
            top5 += _topk_correct(logits, y, 5)
            n += len(y)
    finally:
        model.train(was_training)
    if comm is not None and comm.size > 1:
        n, loss_sum, top1, top5 = comm.allreduce_sum(
            np.array([n, loss_sum, top1, top5], np.float64))
    return loss_sum / n, 100.0 * top1 / n, 100.0 * top5 / n


# --------------------------------------------------------------------------- files

def _write_atomic_h5(path: Path, fill):
    # in memory, checksummed, fsynced, renamed; OSError (naming path) on failure
    run_files.write_h5(path, fill)


def _open_h5(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {e}") from None


def read_log(path) -> dict:
    """Read a run log into plain Python: ``{"config", "status", "diverged_at",
    "iter": {name: array}, "epoch": {...}, "norms": {...}}``."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.h5"
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


# --------------------------------------------------------------------------- trainer

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


class Trainer:
    """Runs one configuration (see :data:`DEFAULTS`) to completion or divergence.

    ``resume=True``: continue the run in ``config["out"]`` with the configuration
    stored in its checkpoint; the keys given in ``config`` may change only where
    ``tinynorm.runconfig`` allows it (ConfigError naming the key otherwise).
    ``resume=False``: a new run; a directory holding a run is refused
    (RunDirError) unless ``overwrite=True``.  Either way the directory is checked
    for writability before any data loads.  ``resume=None`` (the default) decides
    at :meth:`run` (``run(resume=...)``) and checks the directory there.
    """

    def __init__(self, config: dict, data=None, *, resume=None, overwrite=False, comm=None):
        # comm: the ranks of a data-parallel run (tinynorm.parallel); every
        # start-up step that can fail runs through parallel.together, so that a
        # rank that fails makes every rank fail instead of leaving them waiting
        self.comm = comm if comm is not None else parallel.world()
        self.is_writer = self.comm.rank == 0    # rank 0 alone writes the run directory
        given = dict(config or {})
        def checked():
            cfg = config_checks.validate(make_config(given))
            backend.check_device(cfg["device"])     # a missing GPU: one line, before any work
            return cfg
        self.cfg = parallel.together(self.comm, "checking its configuration", checked)
        self.out = Path(self.cfg["out"])
        self._resume, self._overwrite, self._prepared = resume, overwrite, None
        self._ckpt, self._pending_changes = None, []
        self.config_changes = []                 # [{iteration, key, old, new}], kept in the log
        if self.comm.size > 1:
            self._check_ranks_agree(self.cfg, "configuration")
            parallel.together(self.comm, "checking the batch split", self._check_split, self.cfg)
        if resume:
            self._ckpt = parallel.together(self.comm, "reading the checkpoint",
                                           self._read_own_checkpoint)
            if self.comm.size > 1:
                self._ckpt = self.comm.bcast(self._ckpt)
            saved = self._ckpt["config"]
            # the keys the caller set (not the defaults make_config filled in)
            explicit = {k: self.cfg[k] for k, v in given.items()
                        if k in self.cfg and (v is not None or self.cfg[k] is None)}
            explicit["out"] = self.cfg["out"]    # where the checkpoint was found
            self._pending_changes = config_checks.resume_changes(
                saved, explicit, where=str(self.out / "checkpoint.h5"))
            self.cfg = dict(saved, **explicit)
            backend.check_device(self.cfg["device"])  # the checkpoint's, unless given
        if resume is not None:
            self._prepare_dir(resume)
        self.data = data if data is not None else parallel.together(
            self.comm, "loading the data", _Data, self.cfg, (self.comm.rank, self.comm.size))
        cfg = self.cfg
        if self.comm.size > 1 and cfg["device"] == "gpu":     # one rank per GPU of the node
            parallel.together(self.comm, "choosing its GPU", parallel.use_local_gpu, self.comm)
        extra = {}
        if cfg["model"] == "deep_linear":
            x0, _ = self.data.train_batch(0, 0)
            extra["in_features"] = int(np.prod(x0.shape[1:]))
        if cfg["dropout"]:
            extra["dropout"] = cfg["dropout"]
        self.model = build_model(cfg["model"], cfg["norm"], in_channels=self.data.in_channels,
                                 num_classes=self.data.num_classes, width=cfg["width"],
                                 seed=cfg["seed"], stem=cfg["stem"], opts=unit_options(cfg),
                                 depth=cfg["depth"], linear_width=cfg["linear_width"],
                                 dtype=np.dtype(cfg["dtype"]), **extra)
        self.model.to(cfg["device"])          # before the optimizer: velocities start there
        total = cfg["epochs"] * self.data.batches_per_epoch
        self.schedule = LRSchedule(cfg["schedule"], cfg["lr"], total, cfg["lr_final"],
                                   cfg["power"], cfg["warmup"])
        self.opt = SGD(self.model, self.schedule, cfg["momentum"], cfg["weight_decay"])
        self.log = {g: {k: [] for k in keys} for g, keys in SERIES.items()}
        self.epoch, self.batch = 0, 0          # position of the next batch
        self.status, self.diverged_at, self.diverged_reason = "running", -1, ""
        self.interrupted_reason = ""           # the signal, or the write that failed
        self._stop, self._stop_reason = False, ""
        self._signal = 0                       # the last signal this process received
        self._reducer = parallel.StepReducer(self.comm, self.model) if self.comm.size > 1 else None
        self._watchdog = parallel.Watchdog(self.comm, cfg["rank_timeout"])
        self._probe = {}
        self._recorder = SignalRecorder(self.model)
        self.series_names = {"signal": [], "coherence": []}
        self.signal_kinds = []
        layers = dict(self.model.named_layers())
        for role, name in getattr(self.model, "probe_layers", {}).items():
            self._probe[role] = layers[name]

    # -- ranks -------------------------------------------------------------------
    def _check_ranks_agree(self, cfg, what):
        """ParallelError on every rank naming the keys in which the ranks' ``cfg`` differ."""
        all_cfgs = self.comm.allgather(cfg)
        differ = []
        for rank, other in enumerate(all_cfgs):
            for key in sorted(set(other) | set(all_cfgs[0])):
                if other.get(key) != all_cfgs[0].get(key):
                    differ.append(f"{key!r} is {all_cfgs[0].get(key)!r} on rank 0 but "
                                  f"{other.get(key)!r} on rank {rank}")
        if differ:
            raise parallel.ParallelError(f"the ranks were started with different {what}s: "
                                         + "; ".join(differ[:5]))

    def _check_split(self, cfg):
        ranks, batch = self.comm.size, cfg["batch_size"]
        if batch % ranks:
            raise config_checks.ConfigError(
                f"batch_size {batch} is not divisible by the {ranks} ranks (batch_size is the "
                f"global batch; every rank takes batch_size / ranks samples)")
        chunk = cfg["bn_chunk"]
        if chunk and (batch // ranks) % chunk:
            raise config_checks.ConfigError(
                f"bn_chunk {chunk} does not divide the {batch // ranks} samples of each of "
                f"the {ranks} ranks")

    def _read_own_checkpoint(self, path=None, missing="nothing to resume"):
        # rank 0 reads and verifies it; the others receive it (no shared file system needed)
        if not self.is_writer:
            return None
        path = Path(path) if path else self.out / "checkpoint.h5"
        if missing and not path.exists():
            raise FileNotFoundError(f"{missing}: {path} does not exist")
        ck = self._read_checkpoint(path)
        ranks = int(ck["attrs"]["/"].get("ranks", 1))
        if ranks != self.comm.size:
            raise parallel.ParallelError(
                f"{path} was written by a run on {ranks} rank(s); resume it on {ranks} "
                f"(started on {self.comm.size}): the batch split and BN statistics depend on it")
        return ck

    def _verify_ranks(self):
        """ParallelError when the ranks' parameters or buffers are no longer identical."""
        crc = parallel.state_checksum(self.model)
        with self._watchdog:
            sums = self.comm.allgather(crc)
        bad = [r for r, c in enumerate(sums) if c != sums[0]]
        if bad:
            message = (f"the parameters of rank(s) {', '.join(map(str, bad))} differ from "
                       f"rank 0's at iteration {self.opt.iteration} (checksums "
                       f"{', '.join(f'{c:08x}' for c in sums)}); the run stops")
            self.status, self.interrupted_reason = "interrupted", message
            if self.is_writer:                   # the log says why; the last checkpoint stays
                self._persist_here(self.write_log)
            raise parallel.ParallelError(message)

    # -- persistence -------------------------------------------------------------
    def _fill_log(self, f):
        f.attrs["config"] = json.dumps(self.cfg)
        f.attrs["status"] = self.status
        f.attrs["diverged_at"] = self.diverged_at
        f.attrs["diverged_reason"] = self.diverged_reason
        f.attrs["interrupted_reason"] = self.interrupted_reason
        f.attrs["config_changes"] = json.dumps(self.config_changes)
        f.attrs["tinynorm_version"] = __version__
        f.attrs["num_parameters"] = self.model.num_parameters()
        f.attrs["ranks"] = self.comm.size
        for group, series in self.log.items():
            g = f.create_group(group)
            for key, values in series.items():
                g.create_dataset(key, data=np.asarray(values, np.float64))
            if group in self.series_names:
                g.attrs["names"] = json.dumps(self.series_names[group])
            if group == "signal":
                g.attrs["kinds"] = json.dumps(self.signal_kinds)
        norm = f.create_group("normalizer")
        for key, arr in self.data.normalizer_arrays().items():
            norm.create_dataset(key, data=np.asarray(arr))

    def write_log(self):
        self.out.mkdir(parents=True, exist_ok=True)
        _write_atomic_h5(self.out / "log.h5", self._fill_log)

    def save_checkpoint(self):
        def fill(f):
            self._fill_log(f.create_group("log"))
            f.attrs["epoch"], f.attrs["batch"] = self.epoch, self.batch
            f.attrs["iteration"] = self.opt.iteration
            f.attrs["ranks"] = self.comm.size
            for name, arr in self.model.state_dict().items():
                f.create_dataset(f"model/{name}", data=to_numpy(arr))
            for name, arr in self.opt.velocity.items():
                f.create_dataset(f"velocity/{name}", data=to_numpy(arr))
        self.out.mkdir(parents=True, exist_ok=True)
        _write_atomic_h5(self.out / "checkpoint.h5", fill)

    @staticmethod
    def _read_checkpoint(path):
        """Read and verify a checkpoint (CheckpointError when corrupt) into a dict."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint: {path} does not exist")
        arrays, attrs = run_files.read_h5(path, finite=("model", "velocity"))
        try:
            log_attrs, root = attrs["log"], attrs["/"]
            saved = config_checks.validate(make_config(
                base=upgrade_config(json.loads(log_attrs["config"]))))
            position = (int(root["epoch"]), int(root["batch"]), int(root["iteration"]))
        except (KeyError, ValueError) as e:
            raise run_files.CheckpointError(f"checkpoint {path} is not a usable tinynorm "
                                            f"checkpoint: {e}") from None
        # attrs: every object's attributes by path ("/" the root), e.g. attrs["log/iter"]
        return dict(path=path, arrays=arrays, attrs=attrs, log_attrs=log_attrs, config=saved,
                    position=position)

    def load_checkpoint(self, path=None):
        """Restore the model, optimizer, data position and log from a checkpoint.

        The checkpoint is verified first (:class:`tinynorm.checkpoint.CheckpointError`
        when it is corrupt); a configuration key that differs from the checkpoint's
        and may not change on resume is a ConfigError naming it."""
        path = Path(path) if path else self.out / "checkpoint.h5"
        ck, self._ckpt = self._ckpt, None
        if ck is None or ck["path"] != path:
            ck = parallel.together(self.comm, "reading the checkpoint", self._read_own_checkpoint,
                                   path, missing=None)
            if self.comm.size > 1:
                ck = self.comm.bcast(ck)
            self._pending_changes = config_checks.resume_changes(ck["config"], self.cfg,
                                                                 where=str(path))
        arrays, log_attrs = ck["arrays"], ck["log_attrs"]

        def group(prefix):
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        self.model.load_state_dict(group("model/"))
        self.epoch, self.batch, iteration = ck["position"]
        self.opt.load_state_dict({"velocity": group("velocity/"), "iteration": iteration})
        for name, series in self.log.items():
            for key in series:
                series[key] = list(arrays.get(f"log/{name}/{key}", []))
            # a series this version adds (e.g. the clean training evaluation) is NaN
            # for the rows a checkpoint of an earlier version holds
            rows = max(len(v) for v in series.values())
            for values in series.values():
                values.extend([math.nan] * (rows - len(values)))
            group_attrs = ck["attrs"].get(f"log/{name}", {})
            if name in self.series_names and "names" in group_attrs:
                self.series_names[name] = json.loads(group_attrs["names"])
            if name == "signal" and "kinds" in group_attrs:
                self.signal_kinds = json.loads(group_attrs["kinds"])
        self.status = str(log_attrs["status"])
        self.diverged_at = int(log_attrs["diverged_at"])
        self.diverged_reason = str(log_attrs["diverged_reason"])
        self.interrupted_reason = str(log_attrs.get("interrupted_reason", ""))
        self.config_changes = json.loads(log_attrs.get("config_changes", "[]"))
        self.config_changes += [dict(iteration=iteration, key=key, old=old, new=new)
                                for key, old, new in self._pending_changes]
        self._pending_changes = []

    def _prepare_dir(self, resume):
        """Before any work: refuse to reuse a directory that holds another run,
        check that the directory is writable (creating it).  Rank 0's work."""
        parallel.together(self.comm, "preparing the run directory",
                          self._prepare_own_dir if self.is_writer else lambda r: None, resume)
        self._prepared = resume

    def _prepare_own_dir(self, resume):
        holds = run_files.holds_a_run(self.out)
        if not resume and holds and not self._overwrite:
            raise run_files.RunDirError(
                errno.EEXIST, f"run directory {self.out} already holds a run "
                              f"({', '.join(holds)}); pass --resume to continue it or "
                              f"--overwrite to replace it")
        run_files.probe_run_dir(self.out)

    def _checkpoint_bytes(self):
        # parameters + buffers, one velocity per parameter, the log series at the end
        state = sum(int(a.nbytes) for a in self.model.state_dict().values())
        velocity = sum(int(a.nbytes) for a in self.model.parameters().values())
        iters = self.cfg["epochs"] * self.data.batches_per_epoch
        return state + velocity + 8 * iters * len(SERIES["iter"]) + (1 << 20)

    def _persist(self, write):
        """Run ``write`` (save_checkpoint / write_log) on rank 0; on OSError end the
        run as interrupted with the reason instead of crashing.  True when written.
        With several ranks the outcome is broadcast, so that every rank stops."""
        if self.comm.size > 1:
            if write == self.save_checkpoint:
                self._verify_ranks()             # never checkpoint ranks that disagree
            ok = self._persist_here(write) if self.is_writer else None
            with self._watchdog:                 # the others wait here for rank 0's write
                ok, self.status, self.interrupted_reason = self.comm.bcast(
                    (ok, self.status, self.interrupted_reason))
            return ok
        return self._persist_here(write)

    def _persist_here(self, write):
        try:
            write()
            return True
        except OSError as e:
            self.status = "interrupted"
            failure = e.strerror or str(e)
            if not failure.startswith("cannot write"):
                failure = f"cannot write to {self.out}: {failure}"
            previous = self.interrupted_reason
            if not previous:
                self.interrupted_reason = failure
            elif previous.startswith("SIG"):     # the stop's checkpoint failed: say so first
                self.interrupted_reason = f"{failure} (stopping on {previous})"
            return False

    # -- the loop ----------------------------------------------------------------
    def _diverge(self, reason):
        self.status, self.diverged_at, self.diverged_reason = "diverged", self.opt.iteration, reason

    def _weights_finite(self):
        return all(bool(backend.get_array_module(p).isfinite(p).all())
                   for p in self.model.parameters().values())

    def _epoch_end(self, epoch, seconds, n_images, force_eval=False):
        it = self.log["iter"]
        mask = [e == epoch for e in it["epoch"]]
        losses = [l for l, m in zip(it["loss"], mask) if m]
        accs = [a for a, m in zip(it["train_acc"], mask) if m]
        clean = (math.nan,) * 3
        if (epoch + 1) % self.cfg["eval_every"] == 0 or force_eval:
            test = evaluate(self.model, self.data.test_batches(self.cfg["eval_batch_size"]),
                            self.comm)
            batches = self.data.clean_train_batches(self.cfg["eval_batch_size"])
            if batches is not None:
                clean = evaluate(self.model, batches, self.comm)
        else:
            test = (math.nan,) * 3
        row = dict(epoch=epoch, iteration=self.opt.iteration,
                   train_loss=float(np.mean(losses)) if losses else math.nan,
                   train_acc=float(np.mean(accs)) if accs else math.nan,
                   test_loss=test[0], test_top1=test[1], test_top5=test[2],
                   seconds=seconds, images_per_s=n_images / max(seconds, 1e-9),
                   train_loss_clean=clean[0], train_top1_clean=clean[1])
        for k, v in row.items():
            self.log["epoch"][k].append(v)
        return row

    def _on_signal(self, signum, frame):
        # SIGINT, SIGTERM, SIGHUP: finish the current batch, then checkpoint and stop.
        # With several ranks the step's reduction tells every rank (see _reduce_step).
        self._signal = signum
        if self.comm.size == 1:
            self._stop, self._stop_reason = True, signal.Signals(signum).name

    def run(self, resume=None):
        """Train; return the final status (completed, diverged, interrupted).

        ``resume`` defaults to the constructor's.  Raises before the first
        iteration (RunDirError, ConfigError, CheckpointError) when the run
        cannot start; never for a failed write during the run (the status is
        then ``interrupted`` and ``interrupted_reason`` says why)."""
        resume = bool(self._resume) if resume is None else bool(resume)
        if self._prepared is None or self._prepared != resume:
            self._prepare_dir(resume)

        def lock():
            if not self.is_writer:
                return lambda: None
            unlock = run_files.lock_run_dir(self.out)     # one process per run directory
            # a killed writer's temporary files (never another live run's: we hold the lock)
            run_files.remove_stale_tmp(self.out)
            return unlock
        unlock = parallel.together(self.comm, "locking the run directory", lock)
        try:
            return self._run(resume)
        finally:
            unlock()

    def _run(self, resume):
        cfg = self.cfg
        parallel.together(self.comm, "checking the free space",
                          lambda: self.is_writer and run_files.probe_run_dir(
                              self.out, 2 * self._checkpoint_bytes()))
        if resume:
            self.load_checkpoint()
            max_iters = cfg["max_iters"]
            more_to_do = self.epoch < cfg["epochs"] and (max_iters is None
                                                         or self.opt.iteration < max_iters)
            if self.status == "diverged" or (self.status == "completed" and not more_to_do):
                self._persist(self.write_log)     # e.g. log.h5 was deleted
                return self.status
            self.status, self.interrupted_reason = "running", ""
        else:
            if self._overwrite and self.is_writer:
                run_files.clear_run_dir(self.out)
            if cfg["ddi"]:
                from .nn import data_dependent_init
                # the whole first batch on every rank: the same initialization everywhere
                x0, _ = self.data.train_batch(0, 0, whole=True)
                data_dependent_init(self.model, backend.to_device(x0, cfg["device"]))
        self.model.train()
        previous = {}
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            # an ignored signal stays ignored (nohup sets SIGHUP to SIG_IGN)
            if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
                try:
                    previous[name] = signal.signal(getattr(signal, name), self._on_signal)
                except ValueError:               # not the main thread: leave signals alone
                    break
        try:
            self._loop()
            self._persist(self.write_log)
        finally:
            for name, handler in previous.items():
                # None: a handler not installed from Python; the default is the closest
                signal.signal(getattr(signal, name), signal.SIG_DFL if handler is None else handler)
        return self.status

    def _loop(self):
        cfg = self.cfg
        n_batches = self.data.batches_per_epoch
        max_iters = cfg["max_iters"]
        bar = None
        ranks = self.comm.size
        while self.epoch < cfg["epochs"]:
            epoch = self.epoch
            t0, n_images = time.perf_counter(), 0
            batches = self.data.train_batches(epoch, self.batch, cfg["device"])
            if cfg["progress"] and self.is_writer:
                # a bar on a terminal, a plain line a minute elsewhere (CI, nohup, files)
                bar = EpochProgress(n_batches, self.batch, f"epoch {epoch + 1}/{cfg['epochs']}")
            while self.batch < n_batches:
                if self._stop:
                    self.status, self.interrupted_reason = "interrupted", self._stop_reason
                    break
                if max_iters is not None and self.opt.iteration >= max_iters:
                    break
                x, y = next(batches)
                track = cfg["track_norms_every"] and self.opt.iteration % cfg["track_norms_every"] == 0
                for layer in self._probe.values():
                    layer.track_output_norm = bool(track)
                signal_every = cfg["track_signal_every"]
                if signal_every and self.opt.iteration % signal_every == 0:
                    self._record_coherence(self.opt.iteration)   # the weights this step uses
                    with self._recorder as rec:
                        logits = self.model(x)
                    self._record_signal(self.opt.iteration, rec)
                else:
                    logits = self.model(x)
                loss, dlogits = ops.softmax_cross_entropy(logits, y)
                loss = float(loss)
                correct = _topk_correct(to_numpy(logits), to_numpy(y), 1)
                norms = [self._probe[r].output_norm if r in self._probe else math.nan
                         for r in ("first", "last")]
                if ranks > 1:
                    # every rank's gradients first, then one reduction (gradients,
                    # running statistics, loss, accuracy, output norms, stop flags)
                    self.model.backward(dlogits)
                    loss, correct, norms = self._reduce_step(loss, correct, norms)
                acc = 100.0 * correct / (len(y) * ranks)
                it = self.opt.iteration
                if track:
                    self.log["norms"]["iteration"].append(it)
                    for role, value in zip(("first", "last"), norms):
                        self.log["norms"][role].append(value)
                if not math.isfinite(loss) or loss > cfg["diverge_loss"]:
                    self._record_iter(it, epoch, loss, self.opt.lr, acc)
                    self._diverge("non-finite loss" if not math.isfinite(loss)
                                  else f"loss {loss:.4g} > diverge_loss {cfg['diverge_loss']:g}")
                    break
                if ranks == 1:
                    self.model.backward(dlogits)
                lr = self.opt.step()
                self._record_iter(it, epoch, loss, lr, acc)
                self.batch += 1
                n_images += len(y) * ranks
                if bar is not None:
                    dt = time.perf_counter() - t0
                    bar.update(f"loss {loss:.4f} acc {acc:5.1f}% lr {lr:.2e} "
                               f"{n_images / max(dt, 1e-9):.0f} img/s")
            batches.close()                   # on the GPU: stops the prefetching worker
            if bar is not None:
                bar.close()
            if self.status == "running" and not self._weights_finite():
                self._diverge("non-finite weights")
            stopped_early = max_iters is not None and self.opt.iteration >= max_iters
            if self.status != "running" or (stopped_early and self.batch < n_batches):
                if self.status in ("running", "interrupted"):
                    self._persist(self.save_checkpoint)   # the exact position, mid-epoch
                if self.status == "running":           # reached max_iters mid-epoch
                    self._epoch_end(epoch, time.perf_counter() - t0, n_images, force_eval=True)
                    self.status = "completed"
                return
            row = self._epoch_end(epoch, time.perf_counter() - t0, n_images,
                                  force_eval=epoch + 1 == cfg["epochs"])
            self.epoch, self.batch = epoch + 1, 0
            if self.epoch == cfg["epochs"] or stopped_early:
                self.status = "completed"
            if not (self._persist(self.save_checkpoint) and self._persist(self.write_log)):
                return
            if cfg["progress"] and self.is_writer:
                clean = (f"clean train top1 {row['train_top1_clean']:.2f}%  "
                         if math.isfinite(row["train_top1_clean"]) else "")
                print(f"epoch {epoch + 1}/{cfg['epochs']}  train loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2f}%  {clean}test loss {row['test_loss']:.4f} "
                      f"top1 {row['test_top1']:.2f}% top5 {row['test_top5']:.2f}%  "
                      f"{row['images_per_s']:.0f} img/s", flush=True)
            if self.status == "completed":
                return
        self.status = "completed"

    def _reduce_step(self, loss, correct, norms):
        """The step's one reduction over the ranks (tinynorm.parallel.StepReducer):
        gradients and running statistics averaged in place; the global batch's
        mean loss, its number of correct predictions and the probed layers'
        output norms returned.  A signal received by any rank stops every rank
        after this step."""
        ranks, rank = self.comm.size, self.comm.rank
        stops = [0.0] * ranks
        stops[rank] = float(self._signal)
        squares = [v * v for v in norms]         # ||y||^2 adds over the ranks' chunks
        with self._watchdog:
            sums = self._reducer.reduce([loss, correct, *squares, *stops])
        signals = [(r, int(s)) for r, s in enumerate(sums[4:]) if s]
        if signals and not self._stop:
            r, signum = signals[0]
            name = signal.Signals(signum).name
            self._stop, self._stop_reason = True, name if r == rank else f"{name} on rank {r}"
        return float(sums[0]) / ranks, int(round(sums[1])), [math.sqrt(v) for v in sums[2:4]]

    def _record_signal(self, it, rec):
        self.series_names["signal"] = list(rec.names)
        self.signal_kinds = list(rec.kinds)
        rms, mean = list(rec.rms), list(rec.mean)
        if self.comm.size > 1:
            # equal chunks: the batch's mean square and mean are the ranks' averages
            k = len(rms)
            sums = self.comm.allreduce_sum(np.array([r * r for r in rms] + mean, np.float64))
            sums /= self.comm.size
            rms, mean = [math.sqrt(v) for v in sums[:k]], [float(v) for v in sums[k:]]
        s = self.log["signal"]
        s["iteration"].append(it)
        s["rms"].append(rms)
        s["mean"].append(mean)

    def _record_coherence(self, it):
        names, values = weight_coherences(self.model)
        self.series_names["coherence"] = names
        self.log["coherence"]["iteration"].append(it)
        self.log["coherence"]["value"].append(values)

    def _record_iter(self, it, epoch, loss, lr, acc):
        s = self.log["iter"]
        s["iteration"].append(it)
        s["epoch"].append(epoch)
        s["loss"].append(loss)
        s["lr"].append(lr)
        s["train_acc"].append(acc)

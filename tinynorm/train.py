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
from . import runconfig as config_checks
from .backend import to_numpy
from .diagnostics import SignalRecorder, weight_coherences
from .models import build_model
from .optim import SGD, LRSchedule

__all__ = ["DEFAULTS", "Trainer", "read_log", "evaluate", "make_config"]

DEFAULTS = dict(
    model="cifar10_nv",      # cifar10_nv | resnet50 | deep_linear
    norm="bn",               # none | bn | wn | normprop | trelu (tinynorm.norms.norm_names())
    init="caffe_xavier",     # caffe_xavier | glorot | he (tinynorm.nn.init; the paper's Caffe filler)
    wn_g_init="one",         # WN gains start at 1 ("one") or at ||v|| ("norm")
    normprop_scale=1.21,     # NormProp divides by normprop_scale * ||W|| (1.0: the seed paper's formula)
    residual_scale="auto",   # ResNet's act(s (branch + shortcut)): the norm's own s, or a number
    dataset="fashion-mnist",  # fashion-mnist | cifar10 | imagenet
    data_root=None,
    width=1.0,               # channel multiplier (cifar10_nv, resnet50)
    stem="cifar",            # resnet50 stem: cifar | imagenet
    bn_chunk=None,           # BN statistics per chunk of this many samples
    depth=50,                # deep_linear
    linear_width=64,         # deep_linear
    epochs=1,
    max_iters=None,          # stop after this many iterations (the schedule still spans `epochs`)
    batch_size=128,
    lr=0.01,
    schedule="linear",       # constant | linear | poly
    lr_final=1e-5,
    power=2.0,
    warmup=0,
    momentum=0.9,
    weight_decay=0.0,
    seed=0,
    train_limit=None,        # use the first N of a seeded permutation of the training set
    test_limit=None,
    augment=True,            # random crop (+ flip) for training, centre crop for test
    crop=28,
    pad=2,                   # zero padding before the crop (Fashion-MNIST: 28 -> 32)
    min_std=1.0,             # floor of the per-pixel std (grey levels) in the normalizer
    flip=True,
    ddi=False,               # WN data-dependent init on the first batch
    diverge_loss=100.0,
    track_norms_every=0,     # record ||output|| of the first and last layers every k iterations
    track_signal_every=0,    # record every unit's output RMS/mean and every layer's coherence
    eval_every=1,            # evaluate on the test set every k epochs (and at the end)
    eval_batch_size=500,
    out="runs/default",
    progress=True,
    device="cpu",            # cpu | gpu: where the model, optimizer state and batches live
)


# What a log written before these keys existed ran with (its "xavier" was Glorot's).
_LEGACY = dict(init="glorot", wn_g_init="norm", normprop_scale=1.0)


def upgrade_config(cfg: dict) -> dict:
    """A logged configuration as today's keys say it: logs written before the
    norm registry have no ``init`` (they ran Glorot's init, WN gains started at
    ||v||, NormProp without its 1.21, and ResNet's TReLU WN blocks with the
    residual sum scaled by 1/sqrt(2)); ``init = "xavier"`` meant Glorot's."""
    cfg = dict(cfg)
    if "init" not in cfg:
        for key, value in _LEGACY.items():
            cfg.setdefault(key, value)
        if cfg.get("model") == "resnet50" and cfg.get("norm") in ("normprop", "trelu"):
            cfg.setdefault("residual_scale", 1.0 / math.sqrt(2.0))
    if cfg.get("init") == "xavier":
        cfg["init"] = "glorot"
    return cfg


def unit_options(cfg: dict) -> dict:
    """The model-building keys of a configuration (tinynorm.norms.UnitOptions)."""
    return {k: cfg[k] for k in ("init", "wn_g_init", "normprop_scale", "residual_scale",
                                "bn_chunk")}


def make_config(overrides=None, base=None) -> dict:
    """DEFAULTS, then ``base`` (e.g. a TOML file), then ``overrides`` (flags)."""
    cfg = dict(DEFAULTS)
    for layer in (base or {}), (overrides or {}):
        for key, value in layer.items():
            if key not in DEFAULTS:
                raise KeyError(f"unknown configuration key {key!r}; known keys: "
                               f"{', '.join(sorted(DEFAULTS))}")
            if value is not None or key in ("max_iters", "bn_chunk", "train_limit",
                                             "test_limit", "data_root"):
                cfg[key] = value
    return cfg


# --------------------------------------------------------------------------- data

class _Data:
    """Training/test splits, the per-pixel normalizer and the batch schedule."""

    def __init__(self, cfg, dataset=None):
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

    def train_batch(self, epoch, b):
        if self._order[0] != epoch:
            self._order = (epoch, self.batches.order(epoch))
        return self.batches.make_batch(epoch, b, self._order[1])

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

    def test_batches(self, batch_size):
        from .datasets import BatchIterator
        return BatchIterator(self.test, batch_size, self.transform_test, shuffle=False,
                             drop_last=False, prefetch=False).epoch(0)

    def normalizer_arrays(self):
        if self.normalizer is None:
            return {}
        return {"mean": self.normalizer.mean, "std": self.normalizer.std}


def _topk_correct(logits, labels, k):
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(model, batches):
    """Mean loss, top-1 and top-5 accuracy (in %) of ``model`` in eval mode;
    host batches go to the model's device."""
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
          "epoch": ("epoch", "iteration", "train_loss", "train_acc", "test_loss",
                    "test_top1", "test_top5", "seconds", "images_per_s"),
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

    def __init__(self, config: dict, data=None, *, resume=None, overwrite=False):
        given = dict(config or {})
        self.cfg = config_checks.validate(make_config(given))
        backend.check_device(self.cfg["device"])     # a missing GPU: one line, before any work
        self.out = Path(self.cfg["out"])
        self._resume, self._overwrite, self._prepared = resume, overwrite, None
        self._ckpt, self._pending_changes = None, []
        self.config_changes = []                 # [{iteration, key, old, new}], kept in the log
        if resume:
            if not (self.out / "checkpoint.h5").exists():
                raise FileNotFoundError(f"nothing to resume: {self.out / 'checkpoint.h5'} "
                                        f"does not exist")
            self._ckpt = self._read_checkpoint(self.out / "checkpoint.h5")
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
        self.data = data if data is not None else _Data(self.cfg)
        cfg = self.cfg
        extra = {}
        if cfg["model"] == "deep_linear":
            x0, _ = self.data.train_batch(0, 0)
            extra["in_features"] = int(np.prod(x0.shape[1:]))
        self.model = build_model(cfg["model"], cfg["norm"], in_channels=self.data.in_channels,
                                 num_classes=self.data.num_classes, width=cfg["width"],
                                 seed=cfg["seed"], stem=cfg["stem"], opts=unit_options(cfg),
                                 depth=cfg["depth"], linear_width=cfg["linear_width"], **extra)
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
        self._probe = {}
        self._recorder = SignalRecorder(self.model)
        self.series_names = {"signal": [], "coherence": []}
        self.signal_kinds = []
        layers = dict(self.model.named_layers())
        for role, name in getattr(self.model, "probe_layers", {}).items():
            self._probe[role] = layers[name]

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
            ck = self._read_checkpoint(path)
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
        check that the directory is writable (creating it)."""
        holds = run_files.holds_a_run(self.out)
        if not resume and holds and not self._overwrite:
            raise run_files.RunDirError(
                errno.EEXIST, f"run directory {self.out} already holds a run "
                              f"({', '.join(holds)}); pass --resume to continue it or "
                              f"--overwrite to replace it")
        run_files.probe_run_dir(self.out)
        self._prepared = resume

    def _checkpoint_bytes(self):
        # parameters + buffers, one velocity per parameter, the log series at the end
        state = sum(int(a.nbytes) for a in self.model.state_dict().values())
        velocity = sum(int(a.nbytes) for a in self.model.parameters().values())
        iters = self.cfg["epochs"] * self.data.batches_per_epoch
        return state + velocity + 8 * iters * len(SERIES["iter"]) + (1 << 20)

    def _persist(self, write):
        """Run ``write`` (save_checkpoint / write_log); on OSError end the run as
        interrupted with the reason instead of crashing.  True when written."""
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
        if (epoch + 1) % self.cfg["eval_every"] == 0 or force_eval:
            test = evaluate(self.model, self.data.test_batches(self.cfg["eval_batch_size"]))
        else:
            test = (math.nan,) * 3
        row = dict(epoch=epoch, iteration=self.opt.iteration,
                   train_loss=float(np.mean(losses)) if losses else math.nan,
                   train_acc=float(np.mean(accs)) if accs else math.nan,
                   test_loss=test[0], test_top1=test[1], test_top5=test[2],
                   seconds=seconds, images_per_s=n_images / max(seconds, 1e-9))
        for k, v in row.items():
            self.log["epoch"][k].append(v)
        return row

    def _on_signal(self, signum, frame):
        # SIGINT, SIGTERM, SIGHUP: finish the current batch, then checkpoint and stop
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
        unlock = run_files.lock_run_dir(self.out)     # one process per run directory
        try:
            # a killed writer's temporary files (never another live run's: we hold the lock)
            run_files.remove_stale_tmp(self.out)
            return self._run(resume)
        finally:
            unlock()

    def _run(self, resume):
        cfg = self.cfg
        run_files.probe_run_dir(self.out, 2 * self._checkpoint_bytes())
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
            if self._overwrite:
                run_files.clear_run_dir(self.out)
            if cfg["ddi"]:
                from .nn import data_dependent_init
                x0, _ = self.data.train_batch(0, 0)
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
        while self.epoch < cfg["epochs"]:
            epoch = self.epoch
            t0, n_images = time.perf_counter(), 0
            batches = self.data.train_batches(epoch, self.batch, cfg["device"])
            if cfg["progress"]:
                from tqdm import tqdm
                bar = tqdm(total=n_batches, initial=self.batch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                           unit="it", leave=False, dynamic_ncols=True)
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
                acc = 100.0 * _topk_correct(to_numpy(logits), to_numpy(y), 1) / len(y)
                it = self.opt.iteration
                if track:
                    self.log["norms"]["iteration"].append(it)
                    for role in ("first", "last"):
                        layer = self._probe.get(role)
                        self.log["norms"][role].append(layer.output_norm if layer else math.nan)
                if not math.isfinite(loss) or loss > cfg["diverge_loss"]:
                    self._record_iter(it, epoch, loss, self.opt.lr, acc)
                    self._diverge("non-finite loss" if not math.isfinite(loss)
                                  else f"loss {loss:.4g} > diverge_loss {cfg['diverge_loss']:g}")
                    break
                self.model.backward(dlogits)
                lr = self.opt.step()
                self._record_iter(it, epoch, loss, lr, acc)
                self.batch += 1
                n_images += len(y)
                if bar is not None:
                    dt = time.perf_counter() - t0
                    bar.set_postfix_str(f"loss {loss:.4f} acc {acc:5.1f}% lr {lr:.2e} "
                                        f"{n_images / max(dt, 1e-9):.0f} img/s")
                    bar.update(1)
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
            if cfg["progress"]:
                print(f"epoch {epoch + 1}/{cfg['epochs']}  train loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} "
                      f"top1 {row['test_top1']:.2f}% top5 {row['test_top5']:.2f}%  "
                      f"{row['images_per_s']:.0f} img/s", flush=True)
            if self.status == "completed":
                return
        self.status = "completed"

    def _record_signal(self, it, rec):
        self.series_names["signal"] = list(rec.names)
        self.signal_kinds = list(rec.kinds)
        s = self.log["signal"]
        s["iteration"].append(it)
        s["rms"].append(list(rec.rms))
        s["mean"].append(list(rec.mean))

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

"""The training loop: metrics, divergence detection, checkpoints, HDF5 logs.

A run lives in one directory (``config["out"]``):

* ``log.h5``        -- the run log (see :func:`read_log` and the README's
  "Run logs" section): the full configuration, per-iteration and per-epoch
  series, output norms, the final status.  Rewritten atomically (temporary
  file + ``os.replace``) at every epoch end and whenever the run stops.
* ``checkpoint.h5`` -- parameters, buffers, optimizer velocities, the position
  in the data (epoch, batch) and the log series so far; written atomically
  at every epoch end and on Ctrl-C.  ``resume=True`` continues from it and,
  on the CPU and for a fixed seed, gives exactly the numbers of an
  uninterrupted run (the data order and augmentation of every batch are a
  pure function of (seed, epoch, batch index)).

Divergence is a result, not a crash: a non-finite loss, a loss above
``diverge_loss`` or non-finite weights end the run with status ``diverged``
and the iteration at which it happened.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from . import __version__, ops
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

    def __init__(self, cfg):
        from . import datasets
        ds = datasets.load_dataset(cfg["dataset"], cfg["data_root"])
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
    """Mean loss, top-1 and top-5 accuracy (in %) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    n = loss_sum = top1 = top5 = 0
    try:
        for x, y in batches:
            logits = model.forward(x)
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
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        fill(f)
    os.replace(tmp, path)


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
               "diverged_reason": str(f.attrs["diverged_reason"])}
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
    """Runs one configuration (see :data:`DEFAULTS`) to completion or divergence."""

    def __init__(self, config: dict, data=None):
        self.cfg = make_config(config)
        self.out = Path(self.cfg["out"])
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
        total = cfg["epochs"] * self.data.batches_per_epoch
        self.schedule = LRSchedule(cfg["schedule"], cfg["lr"], total, cfg["lr_final"],
                                   cfg["power"], cfg["warmup"])
        self.opt = SGD(self.model, self.schedule, cfg["momentum"], cfg["weight_decay"])
        self.log = {g: {k: [] for k in keys} for g, keys in SERIES.items()}
        self.epoch, self.batch = 0, 0          # position of the next batch
        self.status, self.diverged_at, self.diverged_reason = "running", -1, ""
        self._stop = False
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

    def load_checkpoint(self, path=None):
        path = Path(path) if path else self.out / "checkpoint.h5"
        with _open_h5(path) as f:
            saved = json.loads(f["log"].attrs["config"])
            saved = upgrade_config(saved)
            for key in ("model", "norm", "width", "dataset", "seed", "batch_size", "epochs",
                        "train_limit", "stem", "depth", "linear_width", "init", "wn_g_init",
                        "normprop_scale", "residual_scale"):
                if saved.get(key) != self.cfg.get(key):
                    raise ValueError(f"cannot resume {path}: it was run with {key}="
                                     f"{saved.get(key)!r}, this run has {self.cfg.get(key)!r}")
            self.model.load_state_dict({k: f["model"][k][()] for k in _h5_names(f["model"])})
            self.opt.load_state_dict({"velocity": {k: f["velocity"][k][()]
                                                   for k in _h5_names(f["velocity"])},
                                      "iteration": f.attrs["iteration"]})
            self.epoch, self.batch = int(f.attrs["epoch"]), int(f.attrs["batch"])
            for group, series in self.log.items():
                if group not in f["log"]:      # a log from before the group existed
                    continue
                for key in series:
                    series[key] = list(f["log"][group][key][()])
                if group in self.series_names and "names" in f["log"][group].attrs:
                    self.series_names[group] = json.loads(f["log"][group].attrs["names"])
                if group == "signal" and "kinds" in f["log"][group].attrs:
                    self.signal_kinds = json.loads(f["log"][group].attrs["kinds"])
            self.status = str(f["log"].attrs["status"])
            self.diverged_at = int(f["log"].attrs["diverged_at"])
            self.diverged_reason = str(f["log"].attrs["diverged_reason"])

    # -- the loop ----------------------------------------------------------------
    def _diverge(self, reason):
        self.status, self.diverged_at, self.diverged_reason = "diverged", self.opt.iteration, reason

    def _weights_finite(self):
        return all(bool(np.isfinite(p).all()) for p in self.model.parameters().values())

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

    def _on_sigint(self, signum, frame):
        self._stop = True

    def run(self, resume=False):
        """Train; return the final status (completed, diverged, interrupted)."""
        cfg = self.cfg
        if resume:
            self.load_checkpoint()
            max_iters = cfg["max_iters"]
            more_to_do = self.epoch < cfg["epochs"] and (max_iters is None
                                                         or self.opt.iteration < max_iters)
            if self.status == "diverged" or (self.status == "completed" and not more_to_do):
                return self.status
            self.status = "running"
        elif cfg["ddi"]:
            from .nn import data_dependent_init
            x0, _ = self.data.train_batch(0, 0)
            data_dependent_init(self.model, x0)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.write_log()
        return self.status

    def _loop(self):
        cfg = self.cfg
        n_batches = self.data.batches_per_epoch
        max_iters = cfg["max_iters"]
        bar = None
        while self.epoch < cfg["epochs"]:
            epoch = self.epoch
            t0, n_images = time.perf_counter(), 0
            if cfg["progress"]:
                from tqdm import tqdm
                bar = tqdm(total=n_batches, initial=self.batch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                           unit="it", leave=False, dynamic_ncols=True)
            while self.batch < n_batches:
                if self._stop:
                    self.status = "interrupted"
                    break
                if max_iters is not None and self.opt.iteration >= max_iters:
                    break
                x, y = self.data.train_batch(epoch, self.batch)
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
                acc = 100.0 * _topk_correct(to_numpy(logits), y, 1) / len(y)
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
            if bar is not None:
                bar.close()
            if self.status == "running" and not self._weights_finite():
                self._diverge("non-finite weights")
            stopped_early = max_iters is not None and self.opt.iteration >= max_iters
            if self.status != "running" or (stopped_early and self.batch < n_batches):
                if self.status in ("running", "interrupted"):
                    self.save_checkpoint()             # the exact position, mid-epoch
                if self.status == "running":           # reached max_iters mid-epoch
                    self._epoch_end(epoch, time.perf_counter() - t0, n_images, force_eval=True)
                    self.status = "completed"
                return
            row = self._epoch_end(epoch, time.perf_counter() - t0, n_images,
                                  force_eval=epoch + 1 == cfg["epochs"])
            self.epoch, self.batch = epoch + 1, 0
            if self.epoch == cfg["epochs"] or stopped_early:
                self.status = "completed"
            self.save_checkpoint()
            self.write_log()
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


def _h5_names(group):
    """Dotted dataset names under an HDF5 group (names like "conv1.0.w" are nested)."""
    names = []
    group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names

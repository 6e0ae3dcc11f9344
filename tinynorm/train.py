"""Training a configuration: the step, the loop over epochs, the run around them.

* :func:`train_step` -- forward, loss, backward, the one reduction over the
  ranks of a data-parallel run, the update (skipped when the step diverged);
* :class:`_EpochLoop` -- epochs of steps, evaluation, stopping (signals,
  ``max_iters``, divergence), the status line and the progress bar;
* :class:`Trainer` -- one run: its configuration (checked, merged with the
  checkpoint's on resume), data, model and optimizer; the run directory (its
  files are :mod:`tinynorm.runfiles`'s: the log and the checkpoint, written
  atomically at every epoch end and when the run stops, verified on load).

``resume=True`` continues a run from its checkpoint with the checkpoint's
configuration and, on the CPU, single-threaded and for a fixed seed, gives
exactly the numbers of an uninterrupted run (the data order and augmentation of
every batch are a pure function of (seed, epoch, batch index); with several
threads the float32 results can differ between processes in the last digits).
A checkpoint is written on SIGINT (Ctrl-C), SIGTERM or SIGHUP too.

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

import math
import signal
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import backend, ops, parallel, runfiles
from . import runconfig as config_checks
from .backend import to_numpy
from .diagnostics import SignalRecorder, weight_coherences
from .models import build_model
from .nn import skip_input_grad
from .optim import SGD, LRSchedule
from .progress import EpochProgress
from .runconfig import DEFAULTS, make_config, unit_options, upgrade_config
from .rundata import RunData, evaluate, topk_correct
from .runfiles import SERIES, RunRecord, read_log

__all__ = ["DEFAULTS", "Trainer", "read_log", "evaluate", "make_config", "upgrade_config",
           "train_step", "Step", "unit_options", "RunData", "SERIES"]

_Data = RunData                 # its earlier name


# --------------------------------------------------------------------------- the step

class Step(NamedTuple):
    loss: float                 # the (global) batch's mean loss
    acc: float                  # its top-1 accuracy, in %
    norms: list                 # ||output|| of the probed first and last layers (NaN: none)
    lr: float                   # the learning rate of the update (or of the skipped one)
    diverged: str               # why the update was skipped ("": it was not)


def train_step(model, opt, x, y, *, forward=None, probes=None, reduce=None, ranks=1,
               diverge_loss=math.inf) -> Step:
    """One step: forward, softmax cross-entropy, backward, reduction, update.

    ``forward``: the forward pass (default ``model``; the loop passes one that
    records the signal); ``probes``: role ("first", "last") -> layer whose output
    norm is reported; ``reduce(loss, correct, norms) -> (loss, correct, norms)``:
    a data-parallel run's one reduction over its ``ranks`` (gradients and running
    statistics averaged in place, the sums returned), None for one process.  A
    non-finite loss, or one above ``diverge_loss``, skips the update."""
    logits = (forward or model)(x)
    loss, dlogits = ops.softmax_cross_entropy(logits, y)
    loss = float(loss)
    correct = topk_correct(to_numpy(logits), to_numpy(y), 1)
    probes = probes or {}
    norms = [probes[r].output_norm if r in probes else math.nan for r in ("first", "last")]
    model.backward(dlogits)
    if reduce is not None:
        loss, correct, norms = reduce(loss, correct, norms)
    acc = 100.0 * correct / (len(y) * ranks)
    if not math.isfinite(loss) or loss > diverge_loss:
        why = ("non-finite loss" if not math.isfinite(loss)
               else f"loss {loss:.4g} > diverge_loss {diverge_loss:g}")
        return Step(loss, acc, norms, opt.lr, why)
    return Step(loss, acc, norms, opt.step(), "")


# --------------------------------------------------------------------------- the loop

class _EpochLoop:
    """Drives a :class:`Trainer` from its position (epoch, batch) to the end:
    steps, the records they make, evaluation at epoch ends, stopping (a signal,
    ``max_iters``, divergence, a failed write), checkpoints and the status."""

    def __init__(self, trainer):
        self.t = trainer
        self.cfg = trainer.cfg
        self.record = trainer.record

    def run(self):
        t, cfg = self.t, self.cfg
        n_batches = t.data.batches_per_epoch
        max_iters = cfg["max_iters"]
        while t.epoch < cfg["epochs"]:
            epoch = t.epoch
            t0, n_images = time.perf_counter(), 0
            bar = None
            batches = t.data.train_batches(epoch, t.batch, cfg["device"])
            if cfg["progress"] and t.is_writer:
                # a bar on a terminal, a plain line a minute elsewhere (CI, nohup, files)
                bar = EpochProgress(n_batches, t.batch, f"epoch {epoch + 1}/{cfg['epochs']}")
            while t.batch < n_batches:
                if t._stop:
                    self.record.status, self.record.interrupted_reason = \
                        "interrupted", t._stop_reason
                    break
                if max_iters is not None and t.opt.iteration >= max_iters:
                    break
                x, y = next(batches)
                step = self.step(x, y, epoch)
                if step.diverged:
                    break
                t.batch += 1
                n_images += len(y) * t.comm.size
                if bar is not None:
                    dt = time.perf_counter() - t0
                    bar.update(f"loss {step.loss:.4f} acc {step.acc:5.1f}% lr {step.lr:.2e} "
                               f"{n_images / max(dt, 1e-9):.0f} img/s")
            batches.close()                   # on the GPU: stops the prefetching worker
            if bar is not None:
                bar.close()
            if self.record.status == "running" and not self.weights_finite():
                self.record.diverge(t.opt.iteration, "non-finite weights")
            stopped_early = max_iters is not None and t.opt.iteration >= max_iters
            if self.record.status != "running" or (stopped_early and t.batch < n_batches):
                if self.record.status in ("running", "interrupted"):
                    t._persist(t.save_checkpoint)      # the exact position, mid-epoch
                if self.record.status == "running":    # reached max_iters mid-epoch
                    self.epoch_end(epoch, time.perf_counter() - t0, n_images, force_eval=True)
                    self.record.status = "completed"
                return
            row = self.epoch_end(epoch, time.perf_counter() - t0, n_images,
                                 force_eval=epoch + 1 == cfg["epochs"])
            t.epoch, t.batch = epoch + 1, 0
            if t.epoch == cfg["epochs"] or stopped_early:
                self.record.status = "completed"
            if not (t._persist(t.save_checkpoint) and t._persist(t.write_log)):
                return
            if cfg["progress"] and t.is_writer:
                self.say(epoch, row)
            if self.record.status == "completed":
                return
        self.record.status = "completed"

    def step(self, x, y, epoch) -> Step:
        """One training step and its records (iteration, output norms, signal)."""
        t, cfg = self.t, self.cfg
        it = t.opt.iteration
        track = cfg["track_norms_every"] and it % cfg["track_norms_every"] == 0
        for layer in t._probe.values():
            layer.track_output_norm = bool(track)
        forward = None
        signal_every = cfg["track_signal_every"]
        if signal_every and it % signal_every == 0:
            self.record_coherence(it)             # the weights this step uses

            def forward(x):
                with t._recorder as rec:
                    logits = t.model(x)
                self.record_signal(it, rec)
                return logits
        ranks = t.comm.size
        step = train_step(t.model, t.opt, x, y, forward=forward, probes=t._probe,
                          reduce=t._reduce_step if ranks > 1 else None, ranks=ranks,
                          diverge_loss=cfg["diverge_loss"])
        if track:
            self.record.record_norms(it, *step.norms)
        self.record.record_iter(it, epoch, step.loss, step.lr, step.acc)
        if step.diverged:
            self.record.diverge(t.opt.iteration, step.diverged)
        return step

    def weights_finite(self):
        return all(bool(backend.get_array_module(p).isfinite(p).all())
                   for p in self.t.model.parameters().values())

    def epoch_end(self, epoch, seconds, n_images, force_eval=False):
        """The epoch's row: its training means, the evaluations when due."""
        t, cfg = self.t, self.cfg
        it = self.record.series["iter"]
        mask = [e == epoch for e in it["epoch"]]
        losses = [l for l, m in zip(it["loss"], mask) if m]
        accs = [a for a, m in zip(it["train_acc"], mask) if m]
        clean = (math.nan,) * 3
        if (epoch + 1) % cfg["eval_every"] == 0 or force_eval:
            test = evaluate(t.model, t.data.test_batches(cfg["eval_batch_size"]), t.comm)
            batches = t.data.clean_train_batches(cfg["eval_batch_size"])
            if batches is not None:
                clean = evaluate(t.model, batches, t.comm)
        else:
            test = (math.nan,) * 3
        row = dict(epoch=epoch, iteration=t.opt.iteration,
                   train_loss=float(np.mean(losses)) if losses else math.nan,
                   train_acc=float(np.mean(accs)) if accs else math.nan,
                   test_loss=test[0], test_top1=test[1], test_top5=test[2],
                   seconds=seconds, images_per_s=n_images / max(seconds, 1e-9),
                   train_loss_clean=clean[0], train_top1_clean=clean[1])
        self.record.record_epoch(row)
        return row

    def say(self, epoch, row):
        clean = (f"clean train top1 {row['train_top1_clean']:.2f}%  "
                 if math.isfinite(row["train_top1_clean"]) else "")
        print(f"epoch {epoch + 1}/{self.cfg['epochs']}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_acc']:.2f}%  {clean}test loss {row['test_loss']:.4f} "
              f"top1 {row['test_top1']:.2f}% top5 {row['test_top5']:.2f}%  "
              f"{row['images_per_s']:.0f} img/s", flush=True)

    def record_signal(self, it, rec):
        rms, mean = list(rec.rms), list(rec.mean)
        comm = self.t.comm
        if comm.size > 1:
            # equal chunks: the batch's mean square and mean are the ranks' averages
            k = len(rms)
            sums = comm.allreduce_sum(np.array([r * r for r in rms] + mean, np.float64))
            sums /= comm.size
            rms, mean = [math.sqrt(v) for v in sums[:k]], [float(v) for v in sums[k:]]
        self.record.record_signal(it, rec.names, rec.kinds, rms, mean)

    def record_coherence(self, it):
        names, values = weight_coherences(self.t.model)
        self.record.record_coherence(it, names, values)


# --------------------------------------------------------------------------- the run

class _handling_signals:
    """SIGINT, SIGTERM and SIGHUP go to ``handler`` inside the block (an ignored one
    stays ignored: nohup sets SIGHUP to SIG_IGN; outside the main thread nothing
    changes); the previous handlers come back after it."""

    def __init__(self, handler):
        self.handler, self.previous = handler, {}

    def __enter__(self):
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
                try:
                    self.previous[name] = signal.signal(getattr(signal, name), self.handler)
                except ValueError:               # not the main thread: leave signals alone
                    break

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            # None: a handler not installed from Python; the default is the closest
            signal.signal(getattr(signal, name), signal.SIG_DFL if handler is None else handler)


def _build_model(cfg, data):
    """The configuration's model on its device (built on the host: the same seeded
    init on every device)."""
    extra = {}
    if cfg["model"] == "deep_linear":
        x0, _ = data.train_batch(0, 0)
        extra["in_features"] = int(np.prod(x0.shape[1:]))
    if cfg["dropout"]:
        extra["dropout"] = cfg["dropout"]
    model = build_model(cfg["model"], cfg["norm"], in_channels=data.in_channels,
                        num_classes=data.num_classes, width=cfg["width"], seed=cfg["seed"],
                        stem=cfg["stem"], opts=unit_options(cfg), depth=cfg["depth"],
                        linear_width=cfg["linear_width"], dtype=np.dtype(cfg["dtype"]), **extra)
    skip_input_grad(model)      # the first convolution skips its backward-data pass
    return model.to(cfg["device"])


def _recorded(name):
    """A Trainer attribute kept in its RunRecord (what the log holds)."""
    return property(lambda self: getattr(self.record, name),
                    lambda self, value: setattr(self.record, name, value))


class Trainer:
    """Runs one configuration (see :data:`DEFAULTS`) to completion or divergence.

    ``resume=True``: continue the run in ``config["out"]`` with the configuration
    stored in its checkpoint; the keys given in ``config`` may change only where
    ``tinynorm.runconfig`` allows it (ConfigError naming the key otherwise).
    ``resume=False``: a new run; a directory holding a run is refused
    (RunDirError) unless ``overwrite=True``.  Either way the directory is checked
    for writability before any data loads.  ``resume=None`` (the default) decides
    at :meth:`run` (``run(resume=...)``) and checks the directory there.

    What the log holds is ``self.record`` (:class:`tinynorm.runfiles.RunRecord`);
    ``log`` (its series), ``status``, ``diverged_at``, ``diverged_reason``,
    ``interrupted_reason`` and ``config_changes`` read and write it.
    """

    log = property(lambda self: self.record.series)
    series_names = property(lambda self: self.record.names)
    signal_kinds = _recorded("signal_kinds")
    status = _recorded("status")
    diverged_at = _recorded("diverged_at")
    diverged_reason = _recorded("diverged_reason")
    interrupted_reason = _recorded("interrupted_reason")
    config_changes = _recorded("config_changes")

    def __init__(self, config: dict, data=None, *, resume=None, overwrite=False, comm=None):
        # comm: the ranks of a data-parallel run (tinynorm.parallel); every
        # start-up step that can fail runs through parallel.together, so that a
        # rank that fails makes every rank fail instead of leaving them waiting
        self.comm = comm if comm is not None else parallel.world()
        self.is_writer = self.comm.rank == 0    # rank 0 alone writes the run directory
        self.record = RunRecord()
        given = dict(config or {})

        def checked():
            cfg = config_checks.validate(make_config(given))
            backend.check_device(cfg["device"])     # a missing GPU: one line, before any work
            return cfg
        self.cfg = parallel.together(self.comm, "checking its configuration", checked)
        self.out = Path(self.cfg["out"])
        self._resume, self._overwrite, self._prepared = resume, overwrite, None
        self._ckpt, self._pending_changes = None, []
        if self.comm.size > 1:
            parallel.check_ranks_agree(self.comm, self.cfg, "configuration")
            parallel.together(self.comm, "checking the batch split",
                              config_checks.check_batch_split, self.cfg, self.comm.size)
        if resume:
            self._ckpt = self._read_checkpoint_on_every_rank(missing="nothing to resume")
            saved = self._ckpt["config"]
            # the keys the caller set (not the defaults make_config filled in)
            explicit = {k: self.cfg[k] for k, v in given.items()
                        if k in self.cfg and (v is not None or self.cfg[k] is None)}
            explicit["out"] = self.cfg["out"]    # where the checkpoint was found
            self._pending_changes = config_checks.resume_changes(
                saved, explicit, where=str(self.out / runfiles.CHECKPOINT))
            self.cfg = dict(saved, **explicit)
            backend.check_device(self.cfg["device"])  # the checkpoint's, unless given
        if resume is not None:
            self._prepare_dir(resume)
        self.data = data if data is not None else parallel.together(
            self.comm, "loading the data", RunData, self.cfg, (self.comm.rank, self.comm.size))
        cfg = self.cfg
        if self.comm.size > 1 and cfg["device"] == "gpu":     # one rank per GPU of the node
            parallel.together(self.comm, "choosing its GPU", parallel.use_local_gpu, self.comm)
        self.model = _build_model(cfg, self.data)  # before the optimizer: velocities start there
        total = cfg["epochs"] * self.data.batches_per_epoch
        self.schedule = LRSchedule(cfg["schedule"], cfg["lr"], total, cfg["lr_final"],
                                   cfg["power"], cfg["warmup"])
        self.opt = SGD(self.model, self.schedule, cfg["momentum"], cfg["weight_decay"])
        self.epoch, self.batch = 0, 0          # position of the next batch
        self._stop, self._stop_reason = False, ""
        self._signal = 0                       # the last signal this process received
        self._reducer = parallel.StepReducer(self.comm, self.model) if self.comm.size > 1 else None
        self._watchdog = parallel.Watchdog(self.comm, cfg["rank_timeout"])
        self._recorder = SignalRecorder(self.model)
        layers = dict(self.model.named_layers())
        self._probe = {role: layers[name]
                       for role, name in getattr(self.model, "probe_layers", {}).items()}

    # -- ranks -------------------------------------------------------------------
    def _read_checkpoint_on_every_rank(self, path=None, missing=None):
        """Rank 0 reads and verifies it; the others receive it (no shared file system
        needed).  ParallelError when it was written by another number of ranks."""
        path = Path(path) if path else self.out / runfiles.CHECKPOINT

        def read():
            if not self.is_writer:
                return None
            if missing and not path.exists():
                raise FileNotFoundError(f"{missing}: {path} does not exist")
            ck = runfiles.read_checkpoint(path)
            if ck["ranks"] != self.comm.size:
                raise parallel.ParallelError(
                    f"{path} was written by a run on {ck['ranks']} rank(s); resume it on "
                    f"{ck['ranks']} (started on {self.comm.size}): the batch split and BN "
                    f"statistics depend on it")
            return ck
        ck = parallel.together(self.comm, "reading the checkpoint", read)
        return self.comm.bcast(ck) if self.comm.size > 1 else ck

    def _verify_ranks(self):
        """ParallelError when the ranks' parameters or buffers are no longer identical."""
        with self._watchdog:
            message = parallel.ranks_differ(self.comm, self.model, self.opt.iteration)
        if message:
            self.status, self.interrupted_reason = "interrupted", message
            if self.is_writer:                   # the log says why; the last checkpoint stays
                self._persist_here(self.write_log)
            raise parallel.ParallelError(message)

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

    # -- the run directory's files (tinynorm.runfiles) ---------------------------------
    def _meta(self):
        return dict(config=self.cfg, num_parameters=self.model.num_parameters(),
                    ranks=self.comm.size, normalizer=self.data.normalizer_arrays())

    def write_log(self):
        runfiles.write_log(self.out, self.record, **self._meta())

    def save_checkpoint(self):
        runfiles.write_checkpoint(
            self.out, self.record, position=(self.epoch, self.batch, self.opt.iteration),
            state={k: to_numpy(a) for k, a in self.model.state_dict().items()},
            velocity={k: to_numpy(a) for k, a in self.opt.velocity.items()}, **self._meta())

    def load_checkpoint(self, checkpoint=None):
        """Restore the model, optimizer, data position and log from a checkpoint: a
        path (default OUT/checkpoint.h5) or one :func:`tinynorm.runfiles.read_checkpoint`
        has read.

        The checkpoint is verified first (:class:`tinynorm.runfiles.CheckpointError`
        when it is corrupt); a configuration key that differs from the checkpoint's
        and may not change on resume is a ConfigError naming it."""
        if isinstance(checkpoint, dict):   # read by the caller, who built self.cfg from it
            ck, self._ckpt = checkpoint, None
        else:
            path = Path(checkpoint) if checkpoint else self.out / runfiles.CHECKPOINT
            ck, self._ckpt = self._ckpt, None
            if ck is None or ck["path"] != path:
                ck = self._read_checkpoint_on_every_rank(path)
                self._pending_changes = config_checks.resume_changes(ck["config"], self.cfg,
                                                                     where=str(path))
        self.model.load_state_dict(ck["model"])
        self.epoch, self.batch, iteration = ck["position"]
        self.opt.load_state_dict({"velocity": ck["velocity"], "iteration": iteration})
        self.record.restore(ck)
        self.config_changes += [dict(iteration=iteration, key=key, old=old, new=new)
                                for key, old, new in self._pending_changes]
        self._pending_changes = []

    def _prepare_dir(self, resume):
        """Before any work: refuse to reuse a directory that holds another run,
        check that the directory is writable (creating it).  Rank 0's work."""
        parallel.together(self.comm, "preparing the run directory",
                          lambda: self.is_writer and runfiles.prepare_run_dir(
                              self.out, resume=resume, overwrite=self._overwrite))
        self._prepared = resume

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
            self.record.write_failed(e, self.out)
            return False

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
            unlock = runfiles.lock_run_dir(self.out)     # one process per run directory
            # a killed writer's temporary files (never another live run's: we hold the lock)
            runfiles.remove_stale_tmp(self.out)
            return unlock
        unlock = parallel.together(self.comm, "locking the run directory", lock)
        try:
            return self._run(resume)
        finally:
            unlock()

    def _run(self, resume):
        cfg = self.cfg
        parallel.together(self.comm, "checking the free space",
                          lambda: self.is_writer and runfiles.probe_run_dir(
                              self.out, 2 * runfiles.checkpoint_bytes(
                              self.model, self.cfg["epochs"] * self.data.batches_per_epoch)))
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
                runfiles.clear_run_dir(self.out)
            if cfg["ddi"]:
                from .nn import data_dependent_init
                # the whole first batch on every rank: the same initialization everywhere
                x0, _ = self.data.train_batch(0, 0, whole=True)
                data_dependent_init(self.model, backend.to_device(x0, cfg["device"]))
        self.model.train()
        with _handling_signals(self._on_signal):
            self._loop()
            self._persist(self.write_log)
        return self.status

    def _loop(self):
        """Train from the current position to the end (:class:`_EpochLoop`)."""
        _EpochLoop(self).run()

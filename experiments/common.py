"""Shared machinery of the experiment scripts: presets, resumable runs, log copies.

Every experiment has three presets:

* ``paper`` -- the paper's settings (CIFAR-10 / ImageNet, full size; meant for a GPU);
* ``cpu``   -- scaled to this 2-core machine on Fashion-MNIST; committed logs and figures;
* ``smoke`` -- under two minutes; used by the tests and the README's first command.

``--device cpu|gpu`` says where the runs train; by default the ``paper`` preset
takes the GPU when one is usable (``tinynorm.backend.default_device``) and the
other presets the CPU.

Run directories: ``runs/<preset>/<experiment>/<variant>/`` (checkpoint.h5, log.h5).
Finished logs are copied to ``plots/logs/<experiment>/<variant>.h5`` for the
``cpu`` preset (committed, so the figures can be redrawn without training) and
to ``runs/<preset>/<experiment>/logs/`` otherwise.  Re-running a script resumes
unfinished runs and skips finished ones.

Seeds: a variant that runs with several seeds is one run per seed, named
``<variant>_s<seed>`` (:func:`seeded`); ``--seeds 0,1,2`` sets the seeds of an
experiment's multi-seed (headline) variants, which the figures and tables show
as every seed's value and the mean with a 95% t-interval.

Under ``mpirun -np K`` every variant is one data-parallel run over the K ranks
(tinynorm.parallel); rank 0 decides what to resume, copies the logs and draws
the figures (:func:`is_writer`).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinynorm import parallel  # noqa: E402
from tinynorm.backend import check_device, default_device, tune_allocator  # noqa: E402
from tinynorm.train import Trainer, read_log  # noqa: E402

tune_allocator()   # the experiment scripts are entry points: no page faults per step

PRESETS = ("paper", "cpu", "smoke")


def parse_args(description, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--only", help="comma-separated variants to run (default: all)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where run directories go")
    p.add_argument("--data-root", default=None, help="data set directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the logs")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="comma-separated seeds of the multi-seed variants, e.g. 0,1,2 "
                        "(default: the preset's)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="where to train (default: gpu for the paper preset when one is "
                        "usable, else cpu)")
    if extra:
        extra(p)
    args = p.parse_args()
    args.device = resolve_device(args.preset, args.device)
    return args


def seed_list(text):
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, "
                                         f"got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"distinct integers >= 0, got {text!r}")
    return seeds


def seeded(variants, seeds):
    """One run per (variant, seed): ``{f"{name}_s{seed}": dict(cfg, seed=seed)}``.

    ``seeds`` is a tuple for every variant, or a dict ``{name: tuple}`` (a name
    missing from it runs with seed 0 alone)."""
    out = {}
    for name, cfg in variants.items():
        for seed in (seeds.get(name, (0,)) if isinstance(seeds, dict) else seeds):
            out[f"{name}_s{seed}"] = dict(cfg, seed=seed)
    return out


def resolve_device(preset, device=None):
    """The device of a run: the one asked for (checked: a missing GPU is a
    one-line error), else "gpu" for the paper preset when one is usable, else "cpu"."""
    if device is None:
        device = default_device() if preset == "paper" else "cpu"
    try:
        return check_device(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def log_dir(preset, experiment, runs_root):
    if preset == "cpu":
        return ROOT / "plots" / "logs" / experiment
    return Path(runs_root) / preset / experiment / "logs"


def figure_path(preset, experiment, runs_root, name):
    if preset == "cpu":
        return ROOT / "plots" / f"{name}.png"
    return Path(runs_root) / preset / experiment / f"{name}.png"


def is_writer():
    """True on rank 0 (and in a single process): the rank that writes files and figures."""
    return parallel.world().rank == 0


def run_variants(experiment, variants, args, *, strict=True, known=()):
    """Run ``{variant: config}`` one after the other (resumable); return log paths
    (on rank 0; the other ranks of an mpirun get ``{}``).

    ``--only a,b``: those variants, in that order; a name that is neither one of
    ``variants`` nor in ``known`` (variants a later call runs) is a one-line
    error, unless ``strict=False`` (that later call)."""
    only = [n for n in args.only.split(",") if n] if args.only else None
    if only:
        unknown = [n for n in only if n not in variants and n not in known]
        if unknown and strict:
            raise SystemExit(f"error: {experiment} has no variant {', '.join(unknown)}; "
                             f"choose from {', '.join([*variants, *known])}")
        variants = {n: variants[n] for n in only if n in variants}
    logs = {}
    comm = parallel.world()
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    dest = log_dir(args.preset, experiment, args.runs)
    if comm.rank == 0:
        dest.mkdir(parents=True, exist_ok=True)
    for name, cfg in variants.items():
        out = Path(args.runs) / args.preset / experiment / name
        cfg = dict(cfg, out=str(out), progress=not args.no_progress,
                   device=getattr(args, "device", None) or "cpu")
        if args.data_root:
            cfg["data_root"] = args.data_root
        log_copy = dest / f"{name}.h5"
        if args.plot_only:
            if log_copy.exists():
                logs[name] = log_copy
            continue
        status, resume = None, False
        if comm.rank == 0:               # the run directory is rank 0's
            if (out / "log.h5").exists():
                status = read_log(out)["status"]
            resume = (out / "checkpoint.h5").exists()
        status, resume = comm.bcast((status, resume))
        t0 = time.time()
        if status in ("completed", "diverged"):
            say(f"[{experiment}] {name}: already {status}", flush=True)
        else:
            say(f"[{experiment}] {name}: {'resuming' if resume else 'starting'}", flush=True)
            trainer = Trainer(cfg)
            status = trainer.run(resume=resume)
            extra = f" at iteration {trainer.diverged_at}" if status == "diverged" else ""
            say(f"[{experiment}] {name}: {status}{extra} ({time.time() - t0:.0f} s)", flush=True)
            if status == "interrupted":
                raise SystemExit(130)
        if comm.rank == 0:
            shutil.copyfile(out / "log.h5", log_copy)
        logs[name] = log_copy
    return logs if comm.rank == 0 else {}     # rank 0 draws the figures

"""What the trainer adds to a training step: `tinynorm train`'s img/s against bare steps.

    python experiments/bench_trainer.py                       # cifar10-nv BN, width 0.25
    python experiments/bench_trainer.py --norm wn --iters 30
    python experiments/bench_trainer.py --track-signal-every 0 --track-norms-every 0

One process.  It builds a ``tinynorm.train.Trainer`` for Fashion-MNIST (the
cpu preset's data settings: crop 28, pad 2, min_std 10; ``--iters`` batches
of ``--batch-size`` in one epoch, the fig2 presets' probes), then times

* **bare steps** of a copy of the trainer's model on one fixed batch of
  random data of the same shape: forward, softmax cross-entropy, backward,
  SGD update -- what ``bench_vs_torch.py`` times;
* **the trainer's epoch** (``Trainer.run``): batch assembly and augmentation,
  the probes (output norms, signal and coherence every N iterations), the
  per-iteration log, the progress bar off.  Its ``images_per_s`` is what
  ``tinynorm train`` prints at the end of the epoch (evaluation excluded).

Bare steps run before and after the epoch and their mean counts, so a drift
of the machine shows as the difference of the two.  Nothing else should run
meanwhile; the ratio, not the absolute figures, is what compares across
machines.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import tinynorm  # noqa: E402,F401  first: sets OpenBLAS's thread timeout before NumPy loads
import numpy as np  # noqa: E402

from tinynorm import backend, ops  # noqa: E402
from tinynorm.optim import SGD, LRSchedule  # noqa: E402
from tinynorm.train import Trainer, make_config  # noqa: E402


def bare_steps(model, x, y, steps):
    """Seconds per step (mean of ``steps`` after one warm-up step)."""
    opt = SGD(model, LRSchedule("constant", 0.01, 10 ** 6), momentum=0.9)

    def step():
        _, dlogits = ops.softmax_cross_entropy(model(x), y)
        model.backward(dlogits)
        opt.step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10_nv")
    p.add_argument("--norm", default="bn")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="training iterations (one epoch)")
    p.add_argument("--track-signal-every", type=int, default=25)
    p.add_argument("--track-norms-every", type=int, default=None,
                   help="default: the trainer's")
    args = p.parse_args()
    for flag, value in (("--iters", args.iters), ("--batch-size", args.batch_size)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    backend.tune_allocator()
    with tempfile.TemporaryDirectory() as out:
        over = dict(model=args.model, norm=args.norm, width=args.width,
                    dataset="fashion-mnist", min_std=10.0, crop=28, pad=2,
                    batch_size=args.batch_size, epochs=1,
                    train_limit=args.iters * args.batch_size, test_limit=args.batch_size,
                    track_signal_every=args.track_signal_every, progress=False, out=out)
        if args.track_norms_every is not None:
            over["track_norms_every"] = args.track_norms_every
        trainer = Trainer(make_config(over), resume=False)
        x, y = trainer.data.train_batch(0, 0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(x.shape).astype(x.dtype)
        model = copy.deepcopy(trainer.model)
        n = args.batch_size
        before = bare_steps(model, x, y, args.iters)
        trainer.run()
        after = bare_steps(model, x, y, args.iters)
        row = trainer.log["epoch"]
        trainer_ips = row["images_per_s"][-1]
    bare_ips = n / ((before + after) / 2)
    print(f"{args.model} {args.norm} width {args.width} batch {n}, {args.iters} iterations, "
          f"probes: signal every {args.track_signal_every}")
    print(f"  bare steps      {1e3 * before:7.1f} ms before, {1e3 * after:7.1f} ms after the "
          f"epoch: {bare_ips:6.1f} img/s")
    print(f"  trainer epoch   {1e3 * n / trainer_ips:7.1f} ms per iteration: "
          f"{trainer_ips:6.1f} img/s")
    print(f"  trainer / bare  {trainer_ips / bare_ips:.3f}")


if __name__ == "__main__":
    main()

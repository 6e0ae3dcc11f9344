"""Data parallelism on this machine: 2 ranks x 1 thread against 1 process x 2 threads.

    pip install -e '.[mpi]'
    python experiments/bench_parallel.py                      # all four configurations
    python experiments/bench_parallel.py --only cifar --steps 5

For cifar10-nv (3x28x28) and ResNet-50 (CIFAR stem, 3x32x32) at widths 0.25
and 1.0, global batch 128, it times full training steps -- forward, softmax
cross-entropy, backward, (the ranks' reduction,) SGD update -- on random data:

* ``1 x 2``: one process, OpenBLAS and numba on 2 threads, ``bn_chunk = 64``
  (the statistics two ranks compute, so both do the same arithmetic);
* ``2 x 1``: ``mpirun -np 2``, one thread per rank, 64 samples per rank, the
  gradients averaged by tinynorm.parallel.StepReducer.

Each is a fresh process (or pair); one warm-up step, then the median of
``--steps`` steps, each bracketed by barriers so that it is the slower rank's
time.  It prints images per second and the ratio.  Nothing else should run
meanwhile: the figures are only comparable within one run of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

CONFIGS = [("cifar10_nv", 0.25), ("cifar10_nv", 1.0), ("resnet50", 0.25), ("resnet50", 1.0)]
SHAPES = {"cifar10_nv": (3, 28, 28), "resnet50": (3, 32, 32)}


def worker(args):
    import tinynorm  # noqa: F401  first: sets OpenBLAS's thread timeout before NumPy loads
    import numpy as np
    from tinynorm import ops, parallel
    from tinynorm.models import build_model
    from tinynorm.optim import SGD, LRSchedule

    comm = parallel.world()
    local = args.batch // comm.size
    chunk = args.batch // 2 if args.norm == "bn" else None
    model = build_model(args.model, args.norm, in_channels=3, num_classes=10, width=args.width,
                        bn_chunk=chunk if comm.size == 1 else None)
    opt = SGD(model, LRSchedule("constant", 0.01, 10 ** 6), momentum=0.9)
    reducer = parallel.StepReducer(comm, model) if comm.size > 1 else None
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((local, *SHAPES[args.model])).astype(np.float32)
    y = rng.integers(0, 10, local)
    times = []
    for i in range(args.steps + 1):
        comm.barrier()
        t0 = time.perf_counter()
        loss, dlogits = ops.softmax_cross_entropy(model(x), y)
        model.backward(dlogits)
        if reducer is not None:
            reducer.reduce([float(loss)])
        opt.step()
        comm.barrier()
        if i:                                  # the first step warms caches and JIT
            times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps(dict(step_s=statistics.median(times), times=times)), flush=True)


def launch(args, model, width, ranks):
    threads = 2 // ranks
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model,
           "--width", str(width), "--norm", args.norm, "--batch", str(args.batch),
           "--steps", str(args.steps)]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks)] + cmd
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"bench_parallel: {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="cifar10_nv")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--norm", default="bn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", choices=("cifar", "resnet"), help="only this network")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if shutil.which("mpirun") is None:
        raise SystemExit("bench_parallel: mpirun not found (pip install -e '.[mpi]')")
    print(f"global batch {args.batch}, norm {args.norm}, median of {args.steps} steps; "
          f"{os.cpu_count()} cores")
    print(f"{'network':<12}{'width':>6}{'1x2 img/s':>12}{'2x1 img/s':>12}{'2x1 / 1x2':>11}")
    for model, width in CONFIGS:
        if args.only and not model.startswith(args.only):
            continue
        one = launch(args, model, width, 1)
        two = launch(args, model, width, 2)
        a, b = args.batch / one["step_s"], args.batch / two["step_s"]
        print(f"{model:<12}{width:>6}{a:>12.1f}{b:>12.1f}{b / a:>11.2f}", flush=True)


if __name__ == "__main__":
    main()

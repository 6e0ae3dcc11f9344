"""Run a command while other work keeps every core busy, as on a user's laptop.

    python tests/busy.py -- python -m pytest -q          # the suite under load
    python tests/busy.py --workers 2 --seconds 600        # load only, stops by itself

Each worker is a separate process that alternates single-threaded matrix
products (compute-bound) with large array copies (memory-bound), so that the
command under test competes for both the cores and the memory bandwidth.  The
workers stop when the command ends, after ``--seconds`` at the latest (a bound
even if this script is killed: each worker checks its own deadline), and on
Ctrl-C.  The exit status is the command's.

Use it before every submission: a test that passes alone and fails here depends
on timing, which is a bug in the test or in the code it tests.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time


def _burn(deadline: float, seed: int) -> None:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"     # before NumPy loads its BLAS
    import numpy as np
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((192, 192), dtype=np.float32)
    big = rng.standard_normal(4 << 20, dtype=np.float32)    # 16 MB: beyond the caches
    while time.time() < deadline:
        for _ in range(20):
            a = np.tanh(a @ a.T * 1e-2)
        big[::-1].copy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="busy processes (default: one per core)")
    p.add_argument("--seconds", type=float, default=3600.0,
                   help="the workers stop after this long at the latest (default 3600)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command to run under load, after '--'")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.workers < 1 or args.seconds <= 0:
        p.error("--workers must be >= 1 and --seconds > 0")
    deadline = time.time() + args.seconds
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_burn, args=(deadline, i), daemon=True)
               for i in range(args.workers)]
    for w in workers:
        w.start()
    print(f"busy.py: {args.workers} busy worker(s) for at most {args.seconds:.0f} s",
          file=sys.stderr, flush=True)
    try:
        if command:
            return subprocess.call(command)
        for w in workers:
            w.join()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join()


if __name__ == "__main__":
    sys.exit(main())

"""Convolution speed on this CPU: the conv layers of the paper's cifar10-nv
network (Table 2) at batch 128, float32.

For each layer and each pass -- forward, input gradient (``conv2d_backward_data``)
and weight gradient (``conv2d_backward_filter``) -- it prints the achieved
GFLOP/s (2*N*C_out*C_in*kh*kw*OH*OW flops per pass) next to the GFLOP/s of a
plain float32 ``numpy.matmul`` of the same GEMM shape (M x K @ K x N, both
operands C-contiguous, preallocated output) measured in the same run, and the
ratio conv / matmul.  The conv times include everything the op does (im2col,
layout changes, bias, col2im, output allocation); the target is ratio >= 0.7.
The 3x3 / stride-1 layers (conv2-conv7) run the Winograd F(4x4, 3x3) plan,
which does 4x fewer multiply-adds than the direct count used for GF/s: their
"conv GF/s" is an effective rate and can exceed the matmul's (ratio > 1).
``--no-winograd`` times the im2col plan for every layer, ``--winograd-tile 2``
F(2x2, 3x3) (both through ``tinynorm.config.using``).  Each layer's plan
(``tinynorm.ops.conv_plan``) is printed before its rows.

Each pass and its matmul are timed alternately, ``--repeat`` times, and the
fastest of each is kept, so a neighbour process on the other core disturbs
both sides alike; read the ratios, not the absolute figures.

The header says whether the numba kernels run on all threads or on one
(``tinynorm.ops._kernels.launch``): one, unless the process was started with
``OPENBLAS_THREAD_TIMEOUT`` set low (e.g. 4), because OpenBLAS's idle workers
otherwise spin for ~0.1 s after every GEMM and fight a second numba thread.
Compare ``OPENBLAS_THREAD_TIMEOUT=4 python experiments/bench_ops.py``.

    python experiments/bench_ops.py [--batch 128] [--repeat 5] [--layers conv2,conv8]
                                    [--no-winograd] [--winograd-tile 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinynorm import config, ops  # noqa: E402

# name, C_in, C_out, kernel, pad, input H=W   (paper Table 2; pools 3x3/2 pad 1)
CIFAR10_NV_CONVS = [
    ("conv1", 3, 128, 3, 1, 28),
    ("conv2", 128, 128, 3, 1, 28),
    ("conv3", 128, 128, 3, 1, 28),
    ("conv4", 128, 256, 3, 1, 14),
    ("conv5", 256, 256, 3, 1, 14),
    ("conv6", 256, 256, 3, 1, 14),
    ("conv7", 256, 320, 3, 0, 7),
    ("conv8", 320, 320, 1, 0, 5),
    ("conv9", 320, 10, 1, 0, 5),
]


# a 3x3 / stride-1 layer's shapes, for the header's name of its algorithm
_CONV3X3 = ((128, 128, 28, 28), (128, 128, 3, 3), 1, 1)


def _best_pair(fn_a, fn_b, repeat):
    """Run fn_a and fn_b alternately; return the fastest time of each."""
    ta, tb = [], []
    fn_a(), fn_b()  # warm-up (numba compile / load, workspaces, BLAS threads)
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return min(ta), min(tb)


def _matmul(m, k, n, rng):
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    return lambda: np.matmul(a, b, out=out)


def bench_layer(name, c_in, c_out, k, pad, hw, batch, repeat, rng):
    x = rng.standard_normal((batch, c_in, hw, hw), dtype=np.float32)
    w = (rng.standard_normal((c_out, c_in, k, k), dtype=np.float32)
         / np.float32(np.sqrt(c_in * k * k)))
    b = np.zeros(c_out, np.float32)
    y, cache = ops.conv2d_forward(x, w, b, 1, pad)
    print(f"{name}: {cache.plan}")
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    kk, p_all = c_in * k * k, batch * y.shape[2] * y.shape[3]
    flops = 2.0 * c_out * kk * p_all
    passes = [
        # pass, conv callable, GEMM shape (M, K, N) of that pass
        ("forward", lambda: ops.conv2d_forward(x, w, b, 1, pad), (c_out, kk, p_all)),
        ("input-grad", lambda: ops.conv2d_backward_data(dy, cache), (kk, c_out, p_all)),
        ("weight-grad", lambda: ops.conv2d_backward_filter(dy, cache), (c_out, p_all, kk)),
    ]
    rows = []
    for pass_name, conv_fn, (m, kdim, n) in passes:
        t_conv, t_mm = _best_pair(conv_fn, _matmul(m, kdim, n, rng), repeat)
        rows.append((name, pass_name, f"{m}x{kdim}@{kdim}x{n}", flops / t_conv / 1e9,
                     flops / t_mm / 1e9, t_conv * 1e3))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--layers", default="", help="comma-separated subset, e.g. conv2,conv8")
    parser.add_argument("--no-winograd", action="store_true",
                        help="im2col for every layer (config winograd=False)")
    parser.add_argument("--winograd-tile", type=int, choices=(2, 4), default=None,
                        help="Winograd F(2x2, 3x3) or F(4x4, 3x3) (config winograd_tile)")
    args = parser.parse_args(argv)
    settings = {"winograd": False} if args.no_winograd else {}
    if args.winograd_tile is not None:
        settings["winograd_tile"] = args.winograd_tile
    with config.using(**settings):
        run(args)


def run(args):
    wanted = set(filter(None, args.layers.split(",")))
    rng = np.random.default_rng(0)

    import numba
    from threadpoolctl import threadpool_info
    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
            for i in threadpool_info() if i["user_api"] == "blas"]
    from tinynorm.ops import _kernels
    spin = _kernels.blas_workers_spin()
    print(f"numpy {np.__version__}, BLAS: {', '.join(blas) or '?'}, numba "
          f"{numba.__version__} ({numba.get_num_threads()} threads), batch {args.batch}, "
          f"float32, best of {args.repeat}, 3x3/stride-1 convs by "
          f"{'im2col' if not config.get('winograd') else ops.conv_plan(*_CONV3X3).algorithm}")
    print(f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', '(unset)')}: "
          f"numba kernels run on "
          f"{'1 thread' if spin else f'{numba.get_num_threads()} threads'}")
    header = ("layer", "pass", "GEMM (MxK@KxN)", "conv GF/s", "matmul GF/s", "ratio", "conv ms")
    print("  ".join(f"{h:>16}" if i > 2 else f"{h:<22}" for i, h in enumerate(header)))
    worst = None
    total_conv = total_mm = 0.0
    for spec in CIFAR10_NV_CONVS:
        if wanted and spec[0] not in wanted:
            continue
        for name, pass_name, gemm, gf_conv, gf_mm, ms in bench_layer(*spec, args.batch,
                                                                      args.repeat, rng):
            ratio = gf_conv / gf_mm
            worst = ratio if worst is None else min(worst, ratio)
            total_conv += ms
            total_mm += ms * ratio
            print(f"{name:<22}  {pass_name:<22}  {gemm:<22}  {gf_conv:16.1f}  {gf_mm:16.1f}  "
                  f"{ratio:16.2f}  {ms:16.2f}")
    print(f"\nall passes: conv {total_conv:.0f} ms vs matmul {total_mm:.0f} ms, "
          f"ratio {total_mm / total_conv:.2f}; lowest single ratio {worst:.2f} "
          f"(target >= 0.70)")


if __name__ == "__main__":
    main()

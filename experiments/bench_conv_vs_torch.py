"""Where a ResNet-50 (or cifar10-nv, ``--model cifar10_nv``) step's convolution time goes: every conv shape, tinynorm vs PyTorch.

    python experiments/bench_conv_vs_torch.py [--batch 128] [--threads 2] [--repeat 3]
                                              [--torch-channels-last] [--only 3x3]
                                              [--plans] [--winograd-tile 2] [--no-winograd]

For each distinct convolution of ResNet-50 with the CIFAR stem at 3x32x32
(width 1 unless ``--width``), it times one forward + backward (input and
weight gradients; no input gradient for the stem) of ``tinynorm.ops.conv2d``
and of PyTorch's ``torch.nn.functional.conv2d`` on the same float32 arrays,
alternately, and keeps the fastest of ``--repeat`` runs of each.  It prints
per shape: how many times the shape occurs in the network, the algorithm of
tinynorm's plan (``tinynorm.ops.conv_plan``: winograd4 / winograd2 / im2col /
pointwise, stacked or gemm), both times, the ratio, and the shape's share of
the network's total conv time, then the totals weighted by occurrence.
Every shape's whole plan (chunks and threads too) is printed first;
``--plans`` prints only that (no PyTorch needed).  ``--winograd-tile`` and
``--no-winograd`` run tinynorm under ``tinynorm.config.using(...)``.  The totals are the convolution part of
``bench_vs_torch.py``'s ResNet-50 step; this script says which shapes make
up the difference.

Needs the optional, benchmark-only PyTorch (``pip install torch==2.13.0``
takes a CPU build from local disk on these machines); without it, it says so
and exits.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_vs_torch.py
import tinynorm  # noqa: E402,F401  first: sets OPENBLAS_THREAD_TIMEOUT before NumPy loads
import numpy as np  # noqa: E402

from tinynorm import backend, config, ops  # noqa: E402
from tinynorm.ops import layout  # noqa: E402


def model_convs(model, width=1.0, size=32, in_channels=3):
    """Counter of (C_in, C_out, k, stride, pad, H) over the Conv2d layers of the
    built model (ResNet-50 with the CIFAR stem, or cifar10-nv), read off one
    eval-mode forward of a single image, so that it follows the model code."""
    from tinynorm.models import build_model
    from tinynorm.nn import Conv2d
    kw = {"stem": "cifar"} if model == "resnet50" else {}
    net = build_model(model, "bn", in_channels=in_channels, num_classes=10, width=width,
                      **kw).eval()
    shapes = Counter()
    forward = Conv2d.forward

    def record(layer, x):
        c_out, c_in, k, _ = layer.params["w"].shape
        shapes[(c_in, c_out, k, layer.stride, layer.pad, x.shape[2])] += 1
        return forward(layer, x)
    Conv2d.forward = record
    try:
        net(np.zeros((1, in_channels, size, size), np.float32))
    finally:
        Conv2d.forward = forward
    return shapes


def plan_name(plan):
    """The algorithm of a plan, with the 1x1 variant."""
    if plan.algorithm == "onednn":
        return "onednn"
    if plan.algorithm == "pointwise":
        return "1x1 stacked" if plan.stacked else "1x1 gemm"
    return plan.algorithm


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--model", choices=("resnet50", "cifar10_nv"), default="resnet50",
                   help="whose convolutions (cifar10-nv at 3x28x28 unless --in-channels)")
    p.add_argument("--in-channels", type=int, default=3,
                   help="input channels of cifar10-nv (1: Fashion-MNIST)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--torch-channels-last", action="store_true")
    p.add_argument("--hand-written", action="store_true",
                   help="tinynorm under use_onednn=False: the hand-written plans "
                        "(default: oneDNN where its library loads)")
    p.add_argument("--channels-last", action="store_true",
                   help="tinynorm's x and dy in channels-last memory (tinynorm.ops.layout)")
    p.add_argument("--only", default="", help="substring of the shape label, e.g. 3x3")
    p.add_argument("--plans", action="store_true",
                   help="print tinynorm's plan for every shape and exit (no timing)")
    p.add_argument("--winograd-tile", type=int, choices=(2, 4), default=None,
                   help="tinynorm's Winograd tile (config winograd_tile; default auto)")
    p.add_argument("--no-winograd", action="store_true",
                   help="tinynorm without Winograd (config winograd=False)")
    args = p.parse_args()
    settings = {"winograd": False} if args.no_winograd else {}
    if args.winograd_tile is not None:
        settings["winograd_tile"] = args.winograd_tile
    if args.hand_written:
        settings["use_onednn"] = False
    with config.using(**settings):
        return run(args)


def _shapes(args):
    """(label, count, x shape, w shape, stride, pad, stem) of the selected
    shapes; ``stem``: the model's first convolution (recorded first), whose
    input gradient a step does not need."""
    shapes = (model_convs("resnet50", args.width, 32) if args.model == "resnet50"
              else model_convs("cifar10_nv", args.width, 28, args.in_channels))
    for i, ((ci, co, k, s, pad, h), count) in enumerate(shapes.items()):
        label = f"{ci}->{co} {k}x{k}/{s} @{h}"
        if not args.only or args.only in label:
            yield label, count, (args.batch, ci, h, h), (co, ci, k, k), s, pad, i == 0


def run(args):
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    print(f"tinynorm plans (batch {args.batch}, width {args.width}, {args.threads} threads):")
    for label, count, x_shape, w_shape, s, pad, _ in _shapes(args):
        print(f"  {label:<24} x{count:<2} {ops.conv_plan(x_shape, w_shape, s, pad)}")
    if args.plans:
        return 0
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("PyTorch is not installed: `pip install torch==2.13.0` (benchmark-only).")
        return 0
    backend.tune_allocator()
    ops.conv.onednn.status()               # load libdnnl before limiting threads
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)        # again, now with torch's libraries loaded
    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    fmt = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    print(f"tinynorm {'hand-written plans' if args.hand_written else 'default plans'}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}")
    print(f"batch {args.batch}, width {args.width}, {args.threads} threads, torch "
          f"{torch.__version__} {'channels-last' if args.torch_channels_last else 'NCHW'}, "
          f"best of {args.repeat}")
    rng = np.random.default_rng(0)
    rows = []
    for label, count, x_shape, w_shape, s, pad, first in _shapes(args):
        ci, k = x_shape[1], w_shape[2]
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = (rng.standard_normal(w_shape) / np.sqrt(ci * k * k)).astype(np.float32)
        y, cache = ops.conv2d_forward(x, w, None, s, pad)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        if args.channels_last:
            x, dy = layout.to_channels_last(x), layout.to_channels_last(dy)

        def tn():
            _, cache = ops.conv2d_forward(x, w, None, s, pad)
            if first:
                ops.conv2d_backward_filter(dy, cache)
            else:
                ops.conv2d_backward(dy, cache)

        tx = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=fmt).requires_grad_(not first)
        tw = torch.from_numpy(w).contiguous(memory_format=fmt).requires_grad_(True)
        tdy = torch.from_numpy(np.ascontiguousarray(dy)).contiguous(memory_format=fmt)

        def th():
            tx.grad = tw.grad = None
            F.conv2d(tx, tw, None, s, pad).backward(tdy)

        tn(), th()     # warm-up: numba compilation, workspaces, oneDNN primitives
        t_tn, t_th = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter(); tn(); t_tn.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); th(); t_th.append(time.perf_counter() - t0)
        rows.append((label, count, plan_name(cache.plan), min(t_tn), min(t_th)))
        print(f"  {label:<24} x{count:<2} {rows[-1][2]:<12} tinynorm {1e3 * min(t_tn):8.1f} ms"
              f"  torch {1e3 * min(t_th):8.1f} ms  ratio {min(t_tn) / min(t_th):5.2f}",
              flush=True)
    tot_tn = sum(c * a for _, c, _, a, _ in rows)
    tot_th = sum(c * b for _, c, _, _, b in rows)
    print("\nshape                    count path         tinynorm ms  torch ms  ratio  "
          "share of tinynorm  excess ms")
    for label, c, path, a, b in sorted(rows, key=lambda r: -r[1] * (r[3] - r[4])):
        print(f"{label:<24} {c:>5} {path:<12} {1e3 * c * a:11.1f} {1e3 * c * b:9.1f} "
              f"{a / b:6.2f} {100 * c * a / tot_tn:12.1f}% {1e3 * c * (a - b):14.1f}")
    print(f"{'all convs, weighted':<24} {'':>5} {'':<12} {1e3 * tot_tn:11.1f} "
          f"{1e3 * tot_th:9.1f} {tot_tn / tot_th:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

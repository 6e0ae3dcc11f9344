"""Batch-norm forward+backward speed against the machine's memory bandwidth.

    python experiments/bench_bn.py            # all shapes, about a minute on 2 cores
    python experiments/bench_bn.py --quick    # the two cifar10-nv shapes only
    python experiments/bench_bn.py --reference  # also time the plain NumPy code

For each activation shape (float32, batch 128) it times ``batch_norm_forward``
+ ``batch_norm_backward`` (the fused numba kernels on CPU) and ``np.copyto`` of
an array of the same size, in the same run, and prints

* BN GB/s -- effective bandwidth: the bytes BN must move at least, divided by
  the time.  Forward reads x and writes y; backward reads x and dy and writes
  dx: 5 * nbytes(x) in all (the kernels actually read x twice in each
  direction and dy twice in the backward, but the second reads mostly hit the
  cache: a 28x28 channel at batch 128 is 400 KB);
* copy GB/s -- 2 * nbytes / time of ``np.copyto(dst, x)`` (read + write);
* ratio -- BN GB/s / copy GB/s.  The issue's target is >= 0.5;
* fwd ratio -- the forward alone (2 * nbytes / time) against the copy;
* kernels ratio -- forward+backward through the same kernels but writing into
  preallocated y and dx: the part of the time that is BN's own, without the
  page faults of freshly allocated outputs (see below).

The numba kernels use every core numba sees (NUMBA_NUM_THREADS); ``np.copyto``
uses one.  Other processes on the machine make single figures noisy: read the
ratios: each repetition times the copy, the forward and forward+backward
back to back, and the ratio columns are medians of the per-repetition ratios
(times and GB/s are medians of ``--reps`` repetitions after one warm-up).

Both BN and the copy write into memory, but BN allocates its outputs (y, dx)
on every call, as any op does, while ``np.copyto`` writes into a preallocated
array.  glibc returns freed arrays above 32 MB (and, depending on the heap,
smaller ones) to the OS, so each new output is page-faulted in and zeroed by
the OS on first touch: about 4.5 ms for 51 MB here, more than the copy itself.
The "kernels ratio" column leaves that out; ``--keep-freed-memory`` makes
glibc keep freed memory for reuse (process-wide, as a training loop could).

Shapes: cifar10-nv (paper Table 2, 28x28 crops) -- the BN layers after conv3
(128 channels, 28x28) and conv6 (256 channels, 14x14); ResNet-50 at 224x224
input -- conv1's output (64x112x112) and the outputs of the four stages'
expanding 1x1 convs (256x56x56, 512x28x28, 1024x14x14, 2048x7x7).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinynorm.ops import _bn_numba, batchnorm as bn  # noqa: E402

SHAPES = [
    ("cifar10-nv conv3 BN", (128, 128, 28, 28)),
    ("cifar10-nv conv6 BN", (128, 256, 14, 14)),
    ("resnet50 conv1", (128, 64, 112, 112)),
    ("resnet50 stage1 out", (128, 256, 56, 56)),
    ("resnet50 stage2 out", (128, 512, 28, 28)),
    ("resnet50 stage3 out", (128, 1024, 14, 14)),
    ("resnet50 stage4 out", (128, 2048, 7, 7)),
]


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_shape(shape, reps, reference=False, eps=1e-5):
    """Median times and the median of the per-repetition bandwidth ratios.

    Each repetition times np.copyto, the forward alone and forward+backward
    back to back, so a ratio compares measurements taken under the same load.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[1]
    gamma = np.ones(c, np.float32)
    beta = np.zeros(c, np.float32)
    dst = np.empty_like(x)
    nbytes = x.nbytes

    def copy():
        np.copyto(dst, x)

    def fwd():
        bn.batch_norm_forward(x, gamma, beta, eps)

    def fwd_bwd(forward=bn.batch_norm_forward, backward=bn.batch_norm_backward):
        y, cache = forward(x, gamma, beta, eps)
        backward(dy, cache)

    fused = bn.uses_fused_kernel(x)
    y_out, dx_out = np.empty_like(x), np.empty_like(x)
    layout = (1,) + (shape[0], shape[1], int(np.prod(shape[2:])))

    def kernels():  # the same kernels writing into preallocated y and dx
        y, mean, var, inv_std = _bn_numba.batch_norm_forward_fused(x, gamma, beta, eps,
                                                                   layout, out=y_out)
        cache = bn.BatchNormCache(x, mean, var, inv_std, gamma, True, None, layout[1] * layout[3])
        _bn_numba.batch_norm_backward_fused(dy, cache, layout, out=dx_out)

    fns = (copy, fwd, fwd_bwd) + ((kernels,) if fused else ())
    for fn in fns:  # warm-up (numba compilation on the first shape)
        fn()
    t_copy, t_fwd, t_bn, ratio, fwd_ratio, kernel_ratio = [], [], [], [], [], []
    for _ in range(reps):
        t_copy.append(_timed(copy))
        t_fwd.append(_timed(fwd))
        t_bn.append(_timed(fwd_bwd))
        copy_bw = 2 * nbytes / t_copy[-1]
        ratio.append(5 * nbytes / t_bn[-1] / copy_bw)
        fwd_ratio.append(2 * nbytes / t_fwd[-1] / copy_bw)
        if fused:
            kernel_ratio.append(5 * nbytes / _timed(kernels) / copy_bw)
    med = statistics.median
    row = {
        "shape": shape, "MB": nbytes / 1e6, "fused": fused,
        "t_bn_ms": 1e3 * med(t_bn), "bn_gbs": 5 * nbytes / med(t_bn) / 1e9,
        "copy_gbs": 2 * nbytes / med(t_copy) / 1e9,
        "ratio": med(ratio), "fwd_ratio": med(fwd_ratio),
        "kernel_ratio": med(kernel_ratio) if kernel_ratio else float("nan"),
    }
    if reference:
        row["t_ref_ms"] = 1e3 * _timed(lambda: fwd_bwd(bn.batch_norm_forward_reference,
                                                        bn.batch_norm_backward_reference))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cifar10-nv shapes only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reference", action="store_true",
                        help="also time the plain NumPy forward+backward (1 rep)")
    parser.add_argument("--threads", type=int, default=None,
                        help="numba threads for the kernels (default: all cores)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc only: mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1) so "
                             "freed arrays are reused instead of returned to the OS (shows "
                             "the cost of page faults on fresh outputs)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
        print(f"malloc: keep freed memory ({'set' if ok else 'mallopt FAILED'})")
    shapes = SHAPES[:2] if args.quick else SHAPES
    try:
        import numba
        if args.threads:
            numba.set_num_threads(args.threads)
        threads = numba.get_num_threads()
    except Exception:
        threads = "n/a"
    print(f"batch norm forward+backward, float32, numba threads: {threads}")
    head = (f"{'layer':<22}{'shape':<22}{'MB':>7}{'fwd+bwd ms':>12}{'BN GB/s':>9}"
            f"{'copy GB/s':>11}{'ratio':>7}{'fwd ratio':>11}{'kernels ratio':>15}")
    if args.reference:
        head += f"{'numpy ms':>10}{'speedup':>9}"
    print(head)
    ratios = []
    for name, shape in shapes:
        row = bench_shape(shape, args.reps, args.reference)
        ratios.append(row["ratio"])
        line = (f"{name:<22}{'x'.join(map(str, shape)):<22}{row['MB']:>7.0f}"
                f"{row['t_bn_ms']:>12.1f}{row['bn_gbs']:>9.1f}{row['copy_gbs']:>11.1f}"
                f"{row['ratio']:>7.2f}{row['fwd_ratio']:>11.2f}{row['kernel_ratio']:>15.2f}")
        if args.reference:
            line += f"{row['t_ref_ms']:>10.0f}{row['t_ref_ms'] / row['t_bn_ms']:>9.1f}"
        print(line + ("" if row["fused"] else "  (plain NumPy path)"), flush=True)
    print(f"\nratio = effective BN bandwidth (5 x nbytes / fwd+bwd time) / np.copyto "
          f"bandwidth (2 x nbytes / time), median over repetitions;\nfwd ratio = forward "
          f"alone (2 x nbytes / time) / copy; kernels ratio = fwd+bwd kernels writing into "
          f"preallocated y and dx\n(no page faults for fresh outputs); target >= 0.5; "
          f"worst ratio {min(ratios):.2f}, median {statistics.median(ratios):.2f}")
    return 0 if min(ratios) >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""A tinynorm training step against PyTorch's, on the same CPU (issue 7).

    pip install torch          # optional, benchmark-only dependency
    python experiments/bench_vs_torch.py                  # every network, 3 steps each
    python experiments/bench_vs_torch.py --only cifar     # the three cifar10-nv configs
    python experiments/bench_vs_torch.py --torch-channels-last --allocator tuned

For each network and norm it builds the same model in tinynorm and in plain
PyTorch (the torch modules are made by walking the tinynorm model, so shapes,
order and every weight are the same), checks that one float64
forward/backward agrees (the loss and every parameter gradient), then times
full training steps -- forward, softmax cross-entropy, backward, SGD update
(momentum 0.9) -- of both, alternately in the same process, and prints the
medians and the tinynorm/PyTorch ratio:

* cifar10-nv, batch 128, 3x28x28: none, bn, wn;
* ResNet-50 with the CIFAR stem, batch 128, 3x32x32: none, bn, wn.

Both engines get ``--threads`` threads (numba, OpenBLAS, torch intra-op).
Peak memory is measured in a fresh child process per engine and config (the
growth of the peak RSS, VmHWM, over the RSS after the imports, across two
training steps; ``--no-memory`` skips it, ``--memory-only`` does only that).

``--separate`` times each engine alone in a child process of its own, with
its own OpenMP waiting policy (tinynorm's default spins where oneDNN runs;
alternating in one process needs passive waiting for both, see below), and
prints the ratio of the two medians.

``--allocator tuned`` calls :func:`tinynorm.backend.tune_allocator`, which
makes glibc keep freed memory (as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=...`` would); it is process-wide, so PyTorch gets
it too.  ``default`` leaves glibc alone for both.  ``--torch-channels-last``
runs PyTorch in channels-last memory format (its fastest CPU layout).

``--breakdown`` prints, per config, where each engine's step goes, by layer
type and pass: tinynorm's from :func:`tinynorm.profile.profile_step` (a timer
around every leaf layer), PyTorch's from its profiler (the self CPU time of
every aten op, put in the same categories by name: ``*convolution*``,
``*batch_norm*``, ``relu``/``clamp_min``/``threshold_backward``, ``*pool*``; an op with
``backward`` in its name counts as backward).  Timers add a little to
either engine's total; read the per-category differences.

The BLAS in use (threadpoolctl) and the OpenBLAS environment variables are
printed: an ``OPENBLAS_CORETYPE=Haswell`` in the environment forces a slower
GEMM kernel than the SkylakeX one OpenBLAS picks on its own on this CPU.
Timings are noisy when other processes run: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# Both engines alternate in one process.  PyTorch's OpenMP threads (and
# OpenBLAS's) otherwise spin after each parallel region and take a core from
# whichever engine runs next (measured: tinynorm's cifar10-nv BN step 4.05 s
# right after torch's vs 2.9 s with passive waiting).  Set before torch loads.
# ``--separate`` times each engine in a child process of its own instead, with
# each library's own OpenMP default (the children are started with
# BENCH_OWN_OMP_POLICY=1).
if not os.environ.get("BENCH_OWN_OMP_POLICY"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tinynorm  # noqa: E402,F401  first: sets OPENBLAS_THREAD_TIMEOUT before NumPy loads
import numpy as np  # noqa: E402

from tinynorm import backend, ops, settings  # noqa: E402
from tinynorm.models import cifar10_nv, resnet50  # noqa: E402
from tinynorm.nn import (BatchNorm, Conv2d, GlobalAvgPool2d, Identity, Linear,  # noqa: E402
                         MaxPool2d, ReLU, Sequential, WNConv2d, WNLinear)
from tinynorm.models.blocks import Bottleneck  # noqa: E402
from tinynorm.nn import skip_input_grad  # noqa: E402
from tinynorm.optim import SGD, LRSchedule  # noqa: E402

CONFIGS = {
    "cifar10-nv none": ("cifar10_nv", "none", (3, 28, 28)),
    "cifar10-nv bn": ("cifar10_nv", "bn", (3, 28, 28)),
    "cifar10-nv wn": ("cifar10_nv", "wn", (3, 28, 28)),
    "resnet50 none": ("resnet50", "none", (3, 32, 32)),
    "resnet50 bn": ("resnet50", "bn", (3, 32, 32)),
    "resnet50 wn": ("resnet50", "wn", (3, 32, 32)),
}
LR, MOMENTUM = 1e-3, 0.9


def build_tinynorm(model_name, norm, width, dtype):
    if model_name == "cifar10_nv":
        return cifar10_nv(norm, 3, 10, width, dtype=dtype)
    return resnet50(norm, 10, "cifar", width, dtype=dtype)


# ----------------------------------------------------------------------------
# the same network in PyTorch, made by walking the tinynorm model
# ----------------------------------------------------------------------------

def torch_modules():
    import torch
    import torch.nn.functional as F

    class WNConv(torch.nn.Module):
        """o = conv(x, g v / (||v|| + eps)) + b, one norm per output channel."""

        def __init__(self, layer):
            super().__init__()
            self.stride, self.pad, self.eps = layer.stride, layer.pad, layer.eps
            self.v = torch.nn.Parameter(torch.empty(layer.params["v"].shape))
            self.g = torch.nn.Parameter(torch.empty(layer.params["g"].shape))
            self.b = torch.nn.Parameter(torch.empty(layer.params["b"].shape))

        def forward(self, x):
            norm = torch.linalg.vector_norm(self.v, dim=(1, 2, 3), keepdim=True)
            w = self.v * (self.g.view(-1, 1, 1, 1) / (norm + self.eps))
            return F.conv2d(x, w, self.b, self.stride, self.pad)

    class WNLin(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.eps = layer.eps
            self.v = torch.nn.Parameter(torch.empty(layer.params["v"].shape))
            self.g = torch.nn.Parameter(torch.empty(layer.params["g"].shape))
            self.b = torch.nn.Parameter(torch.empty(layer.params["b"].shape))

        def forward(self, x):
            norm = torch.linalg.vector_norm(self.v, dim=1, keepdim=True)
            return F.linear(x, self.v * (self.g.view(-1, 1) / (norm + self.eps)), self.b)

    class Block(torch.nn.Module):
        def __init__(self, branch, shortcut):
            super().__init__()
            self.branch, self.shortcut = branch, shortcut

        def forward(self, x):
            return F.relu(self.branch(x) + self.shortcut(x), inplace=True)

    class GlobalPool(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    return torch, WNConv, WNLin, Block, GlobalPool


def to_torch(layer, pairs):
    """A torch module computing what the tinynorm ``layer`` computes; appends
    (tinynorm layer, key, torch parameter) to ``pairs`` for every parameter."""
    torch, WNConv, WNLin, Block, GlobalPool = torch_modules()
    nn = torch.nn
    if isinstance(layer, Sequential):
        return nn.Sequential(*[to_torch(c, pairs) for c in layer.children.values()])
    if isinstance(layer, Bottleneck):
        if layer.scale != 1.0 or not isinstance(layer.children["act"], ReLU):
            raise NotImplementedError("only the none/bn/wn bottleneck is translated")
        return Block(to_torch(layer.children["branch"], pairs),
                     to_torch(layer.children["shortcut"], pairs))
    if isinstance(layer, Conv2d):
        co, ci, kh, kw = layer.params["w"].shape
        m = nn.Conv2d(ci, co, (kh, kw), layer.stride, layer.pad, bias="b" in layer.params)
        pairs.append((layer, "w", m.weight))
        if "b" in layer.params:
            pairs.append((layer, "b", m.bias))
        return m
    if isinstance(layer, WNConv2d):
        m = WNConv(layer)
        pairs += [(layer, "v", m.v), (layer, "g", m.g), (layer, "b", m.b)]
        return m
    if isinstance(layer, Linear):
        do, di = layer.params["w"].shape
        m = nn.Linear(di, do, bias="b" in layer.params)
        pairs.append((layer, "w", m.weight))
        if "b" in layer.params:
            pairs.append((layer, "b", m.bias))
        return m
    if isinstance(layer, WNLinear):
        m = WNLin(layer)
        pairs += [(layer, "v", m.v), (layer, "g", m.g), (layer, "b", m.b)]
        return m
    if isinstance(layer, BatchNorm):
        m = nn.BatchNorm2d(layer.num_channels, eps=layer.eps, momentum=layer.momentum)
        pairs += [(layer, "gamma", m.weight), (layer, "beta", m.bias)]
        return m
    if isinstance(layer, ReLU):
        return nn.ReLU(inplace=True)
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel, layer.stride, layer.pad)
    if isinstance(layer, GlobalAvgPool2d):
        return GlobalPool()
    if isinstance(layer, Identity):
        return nn.Identity()
    raise NotImplementedError(f"no torch translation for {type(layer).__name__}")


def build_pair(model_name, norm, width, dtype):
    model = build_tinynorm(model_name, norm, width, dtype)
    tmodel, pairs = torch_twin(model, dtype)
    return model, tmodel, pairs


def torch_twin(model, dtype):
    """The torch module computing what the tinynorm ``model`` (on the host)
    computes, with the same weights, and its (layer, key, parameter) pairs."""
    import torch
    pairs = []
    tmodel = to_torch(model, pairs)
    tmodel = tmodel.to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for layer, key, p in pairs:
            p.copy_(torch.from_numpy(np.ascontiguousarray(layer.params[key])))
    n_params = sum(p.numel() for p in tmodel.parameters())
    if n_params != model.num_parameters():
        raise AssertionError(f"torch model has {n_params} parameters, tinynorm "
                             f"{model.num_parameters()}")
    return tmodel, pairs


# ----------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------

def tinynorm_stepper(model):
    opt = SGD(model, LRSchedule("constant", LR, 10**9), momentum=MOMENTUM)
    model.train()
    skip_input_grad(model)     # as the trainer does (PyTorch's input has no requires_grad)

    def step(x, y):
        logits = model(x)
        loss, dlogits = ops.softmax_cross_entropy(logits, y)
        model.backward(dlogits)
        opt.step()
        return float(loss)
    return step


def torch_stepper(tmodel, channels_last):
    import torch
    import torch.nn.functional as F
    if channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM)
    tmodel.train()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tmodel(x), y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def torch_input(x, y, channels_last):
    import torch
    tx = torch.from_numpy(x)
    if channels_last:
        tx = tx.contiguous(memory_format=torch.channels_last)
    return tx, torch.from_numpy(y.astype(np.int64))


def make_batch(batch, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + shape).astype(dtype)
    y = rng.integers(0, 10, batch)
    return x, y


def check_float64(model_name, norm, width, batch=4):
    """One float64 forward/backward in both; returns the worst relative error."""
    import torch
    import torch.nn.functional as F
    model, tmodel, pairs = build_pair(model_name, norm, width, np.float64)
    x, y = make_batch(batch, CONFIGS_SHAPE[model_name], np.float64, seed=1)
    model.train()
    logits = model(x)
    loss, dlogits = ops.softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    tmodel.train()
    tx, ty = torch_input(x, y, False)
    tloss = F.cross_entropy(tmodel(tx), ty)
    tloss.backward()

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
    worst = ("loss", rel(np.float64(loss), tloss.item()))
    for layer, key, p in pairs:
        e = rel(layer.grads[key], p.grad.numpy())
        if e > worst[1]:
            worst = (f"{type(layer).__name__}.{key}", e)
    return worst


CONFIGS_SHAPE = {"cifar10_nv": (3, 28, 28), "resnet50": (3, 32, 32)}


# ----------------------------------------------------------------------------
# memory (child process per engine and config)
# ----------------------------------------------------------------------------

BREAKDOWN_CATEGORIES = ("convolution", "batch norm", "relu", "pooling")


def torch_category(op_name):
    """The tinynorm.profile category of an aten op, by its name."""
    name = op_name.lower()
    if "convolution" in name:
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if "relu" in name or "clamp_min" in name or "threshold_backward" in name:
        return "relu"
    if "pool" in name:
        return "pooling"
    return "other"


def breakdown(config, args):
    """Print tinynorm's and PyTorch's step, by category and pass (ms)."""
    import torch
    from tinynorm.profile import profile_step
    model_name, norm, shape = CONFIGS[config]
    model, tmodel, _ = build_pair(model_name, norm, args.width, np.float32)
    x, y = make_batch(args.batch, shape, np.float32)
    res = profile_step(model, x, y, steps=args.steps, warmup=args.warmup, lr=LR)
    tn = {c: dict(res["by_pass"].get(c, {"forward": 0.0, "backward": 0.0}))
          for c in BREAKDOWN_CATEGORIES}
    tn["other"] = {"forward": res["total"] - sum(v["forward"] + v["backward"]
                                                 for v in tn.values()), "backward": 0.0}
    tn_total = res["total"]
    tx, ty = torch_input(x, y, args.torch_channels_last)
    th_step = torch_stepper(tmodel, args.torch_channels_last)
    for _ in range(args.warmup):
        th_step(tx, ty)
    th = {c: {"forward": 0.0, "backward": 0.0} for c in (*BREAKDOWN_CATEGORIES, "other")}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            th_step(tx, ty)
        th_total = (time.perf_counter() - t0) / args.steps
    for ev in prof.key_averages():
        cat = torch_category(ev.key)
        side = "backward" if "backward" in ev.key.lower() else "forward"
        th[cat][side] += ev.self_cpu_time_total * 1e-6 / args.steps
    # what no op accounts for (Python, autograd's engine) goes to "other"
    th["other"]["forward"] += th_total - sum(v["forward"] + v["backward"] for v in th.values())
    print(f"{config}: ms per step, tinynorm / PyTorch "
          f"({'channels-last' if args.torch_channels_last else 'NCHW'})")
    print(f"  {'category':<12}{'fwd tn':>9}{'fwd th':>9}{'bwd tn':>9}{'bwd th':>9}"
          f"{'tn - th':>9}")
    for cat in (*BREAKDOWN_CATEGORIES, "other"):
        a, b = tn[cat], th[cat]
        diff = a["forward"] + a["backward"] - b["forward"] - b["backward"]
        print(f"  {cat:<12}{1e3 * a['forward']:>9.1f}{1e3 * b['forward']:>9.1f}"
              f"{1e3 * a['backward']:>9.1f}{1e3 * b['backward']:>9.1f}{1e3 * diff:>9.1f}")
    print(f"  {'total':<12}{1e3 * tn_total:>36.1f} / {1e3 * th_total:.1f}"
          f"  ratio {tn_total / th_total:.2f}", flush=True)


def _status_kb(field):
    """A /proc/self/status memory field in kB (VmRSS: now, VmHWM: peak).

    Not ``getrusage``'s ru_maxrss: Linux carries it across fork and exec, so a
    child would report its parent's peak whenever that was higher."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(engine, config, args):
    import torch
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        backend.tune_allocator()
    model_name, norm, shape = CONFIGS[config]
    base = _status_kb("VmRSS")
    x, y = make_batch(args.batch, shape, np.float32)
    if engine == "tinynorm":
        model = build_tinynorm(model_name, norm, args.width, np.float32)
        step = tinynorm_stepper(model)
    else:
        _, tmodel, _ = build_pair(model_name, norm, args.width, np.float32)
        step = torch_stepper(tmodel, args.torch_channels_last)
        x, y = torch_input(x, y, args.torch_channels_last)
    for _ in range(2):
        step(x, y)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024}))


def time_child(engine, config, args):
    """Median ms of ``args.steps`` training steps of one engine, alone in this process."""
    import torch
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        backend.tune_allocator()
    model_name, norm, shape = CONFIGS[config]
    x, y = make_batch(args.batch, shape, np.float32)
    model, tmodel, _ = build_pair(model_name, norm, args.width, np.float32)
    if engine == "tinynorm":
        step = tinynorm_stepper(model)
    else:
        step = torch_stepper(tmodel, args.torch_channels_last)
        x, y = torch_input(x, y, args.torch_channels_last)
    for _ in range(args.warmup):
        step(x, y)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * statistics.median(times)}))


def measure_time(engine, config, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--time-child", engine, config,
           "--batch", str(args.batch), "--width", str(args.width), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--allocator", args.allocator]
    if args.torch_channels_last:
        cmd.append("--torch-channels-last")
    if args.hand_written:
        cmd.append("--hand-written")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["BENCH_OWN_OMP_POLICY"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"time child {engine} {config} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def measure_memory(engine, config, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", engine, config,
           "--batch", str(args.batch), "--width", str(args.width),
           "--threads", str(args.threads), "--allocator", args.allocator]
    if args.torch_channels_last:
        cmd.append("--torch-channels-last")
    if args.hand_written:
        cmd.append("--hand-written")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def run_check(config, args):
    """:func:`check_float64` in a child process.  Run in the timing process, a
    float64 step left the following float32 tinynorm steps 1.7x slower on 2
    threads whenever torch was loaded too (cifar10-nv: 3.4 s instead of 2.0 s;
    not seen without torch or on one thread; cause not found -- numba's and
    torch's OpenMP runtimes share the process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--check-child", config,
           "--width", str(args.width)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return f"check failed: {out.stderr.strip().splitlines()[-1:]}", float("inf")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["name"], result["error"]


# ----------------------------------------------------------------------------

def blas_note():
    try:
        from threadpoolctl import threadpool_info
        info = [f"{d.get('internal_api')} {d.get('version')} {d.get('architecture')} "
                f"threads={d.get('num_threads')}" for d in threadpool_info()
                if d.get("user_api") == "blas"]
    except ImportError:
        info = ["threadpoolctl not installed"]
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_WAIT_POLICY",
                                      "OPENBLAS_THREAD_TIMEOUT", "GLIBC_TUNABLES")
           if k in os.environ}
    return "; ".join(info) + f"; env {env or '{}'}"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated substrings of config names "
                   "(e.g. 'cifar', 'resnet50 bn')")
    p.add_argument("--steps", type=int, default=3, help="timed steps per engine and config")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", choices=("default", "tuned"), default="tuned")
    p.add_argument("--torch-channels-last", action="store_true")
    p.add_argument("--hand-written", action="store_true",
                   help="tinynorm without oneDNN: the hand-written convolutions on NCHW "
                        "(use_onednn=False, channels_last=False); default: the library's "
                        "defaults (oneDNN, channels-last, where its library loads)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 agreement check")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory children")
    p.add_argument("--separate", action="store_true",
                   help="time each engine alone in its own child process, with its own "
                        "OpenMP waiting policy (default: both alternate in this process, "
                        "OpenMP waiting passive for both)")
    p.add_argument("--breakdown", action="store_true",
                   help="where each engine's step goes, by layer type and pass")
    p.add_argument("--time-child", nargs=2, metavar=("ENGINE", "CONFIG"),
                   help=argparse.SUPPRESS)
    p.add_argument("--memory-child", nargs=2, metavar=("ENGINE", "CONFIG"),
                   help=argparse.SUPPRESS)
    p.add_argument("--check-child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hand_written:
        with settings.using(use_onednn=False, channels_last=False):
            return _main(args)
    return _main(args)


def _main(args):
    try:
        import torch
    except ImportError:
        print("bench_vs_torch: PyTorch is not installed (it is an optional, benchmark-only "
              "dependency): pip install torch")
        return 0
    import numba
    from threadpoolctl import threadpool_limits
    onednn_ok, onednn_why = ops.conv.onednn.status()   # load libdnnl before limiting threads
    threadpool_limits(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return 0
    if args.time_child:
        time_child(*args.time_child, args)
        return 0
    if args.check_child:
        model_name, norm, _ = CONFIGS[args.check_child]
        name, err = check_float64(model_name, norm, args.width)
        print(json.dumps({"name": name, "error": err}))
        return 0
    if args.allocator == "tuned":
        backend.tune_allocator()

    configs = [c for c in CONFIGS
               if not args.only or any(s.strip() in c for s in args.only.split(","))]
    print(f"tinynorm vs PyTorch {torch.__version__}: batch {args.batch}, width {args.width}, "
          f"{args.threads} threads, allocator {args.allocator}, torch "
          f"{'channels-last' if args.torch_channels_last else 'NCHW'}, {args.steps} steps; "
          f"tinynorm convolutions: "
          f"{'hand-written, NCHW' if args.hand_written or not onednn_ok else 'oneDNN, channels-last'}"
          f"{'' if onednn_ok or args.hand_written else ' (' + onednn_why + ')'}")
    print(f"BLAS: {blas_note()}", flush=True)
    rows = []
    for config in configs:
        model_name, norm, shape = CONFIGS[config]
        if args.memory_only:
            row = {"config": config, "tinynorm_mb": measure_memory("tinynorm", config, args),
                   "torch_mb": measure_memory("torch", config, args)}
            rows.append(row)
            print(f"{config}: peak memory tinynorm {row['tinynorm_mb']:.0f} MB, torch "
                  f"{row['torch_mb']:.0f} MB", flush=True)
            continue
        if not args.no_check:
            name, err = run_check(config, args)
            status = "ok" if err < 1e-9 else "MISMATCH"
            print(f"{config}: float64 check {status} (worst relative error {err:.1e} "
                  f"in {name})", flush=True)
        if args.breakdown:
            breakdown(config, args)
            continue
        if args.separate:
            t_ms, th_ms = (measure_time("tinynorm", config, args),
                           measure_time("torch", config, args))
            row = {"config": config, "tinynorm_ms": t_ms, "torch_ms": th_ms,
                   "ratio": t_ms / th_ms}
            if not args.no_memory:
                row["tinynorm_mb"] = measure_memory("tinynorm", config, args)
                row["torch_mb"] = measure_memory("torch", config, args)
            rows.append(row)
            print(f"{config}: tinynorm {t_ms:.0f} ms, torch {th_ms:.0f} ms (separate "
                  f"processes), ratio {row['ratio']:.2f}", flush=True)
            continue
        model, tmodel, _ = build_pair(model_name, norm, args.width, np.float32)
        x, y = make_batch(args.batch, shape, np.float32)
        tx, ty = torch_input(x, y, args.torch_channels_last)
        tn_step = tinynorm_stepper(model)
        th_step = torch_stepper(tmodel, args.torch_channels_last)
        for _ in range(args.warmup):
            tn_step(x, y)
            th_step(tx, ty)
        t_tn, t_th = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            tn_step(x, y)
            t1 = time.perf_counter()
            th_step(tx, ty)
            t2 = time.perf_counter()
            t_tn.append(t1 - t0)
            t_th.append(t2 - t1)
        del model, tmodel, tn_step, th_step
        ratios = [a / b for a, b in zip(t_tn, t_th)]
        row = {"config": config, "tinynorm_ms": 1e3 * statistics.median(t_tn),
               "torch_ms": 1e3 * statistics.median(t_th), "ratio": statistics.median(ratios)}
        if not args.no_memory:
            row["tinynorm_mb"] = measure_memory("tinynorm", config, args)
            row["torch_mb"] = measure_memory("torch", config, args)
        rows.append(row)
        print(f"{config}: tinynorm {row['tinynorm_ms']:.0f} ms, torch {row['torch_ms']:.0f} ms, "
              f"ratio {row['ratio']:.2f}", flush=True)

    if args.memory_only:
        return 0
    print()
    head = f"{'config':<18}{'tinynorm ms':>12}{'torch ms':>10}{'ratio':>7}"
    if not args.no_memory:
        head += f"{'tinynorm MB':>13}{'torch MB':>10}"
    print(head)
    for r in rows:
        line = f"{r['config']:<18}{r['tinynorm_ms']:>12.0f}{r['torch_ms']:>10.0f}{r['ratio']:>7.2f}"
        if not args.no_memory:
            line += f"{r['tinynorm_mb']:>13.0f}{r['torch_mb']:>10.0f}"
        print(line)
    by = {r["config"]: r for r in rows}
    for net in ("cifar10-nv", "resnet50"):
        none, bn, wn = (by.get(f"{net} {n}") for n in ("none", "bn", "wn"))
        if none and wn:
            print(f"{net}: WN step / no-norm step = "
                  f"{wn['tinynorm_ms'] / none['tinynorm_ms']:.3f} (tinynorm), "
                  f"{wn['torch_ms'] / none['torch_ms']:.3f} (torch)")
        if none and bn:
            print(f"{net}: BN's extra cost over no-norm = "
                  f"{100 * (1 - none['tinynorm_ms'] / bn['tinynorm_ms']):.1f}% of the BN step "
                  f"(tinynorm), {100 * (1 - none['torch_ms'] / bn['torch_ms']):.1f}% (torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

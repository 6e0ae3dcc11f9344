"""The Python half of experiments/gpu_check.sh: each subcommand prints one compact
block of results (and, with --json, writes them), so a log cut short by a timeout
still says what ran.

    python experiments/gpu_check.py versions     # packages, the cuDNN frontend, the GPU
    python experiments/gpu_check.py convs        # one convolution per path vs the CPU
    python experiments/gpu_check.py compare      # a training step of each model, GPU vs CPU
    python experiments/gpu_check.py bench        # steps vs PyTorch + cuDNN; BN's time share

``--device cpu --small`` runs the same code on the CPU at tiny sizes (how it is
tested on machines without a GPU; the numbers then mean nothing).  Exit status
3 when the device is not usable, 1 when ``convs`` finds a wrong result (or,
under ``TINYNORM_REQUIRE_CUDNN=1``, a GPU convolution that did not run cuDNN).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tinynorm import backend, config, ops  # noqa: E402
from tinynorm.models import build_model  # noqa: E402
from tinynorm.norms import NORM_REGISTRY, norm_names  # noqa: E402
from tinynorm.optim import SGD, LRSchedule  # noqa: E402

# TINYNORM_REQUIRE_CUDNN=1 (gpu_check.sh sets it): a GPU convolution that takes the
# generic plan is a failure, not a fallback -- else a run without the cuDNN frontend
# passes with ops/conv/cudnn.py never executed
REQUIRE_CUDNN = os.environ.get("TINYNORM_REQUIRE_CUDNN", "") not in ("", "0")

# Errors relative to the largest |reference| entry.  float64 differs from the CPU only
# in summation order; float32 without TF32 is ~1e-6 off on these convolutions, TF32
# (11 significant bits) ~1e-3: 1e-4 tells them apart.
TOL = {np.dtype(np.float64): 1e-8, np.dtype(np.float32): 1e-4}


def rel_error(got, ref):
    got = np.asarray(backend.to_numpy(got), np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# -- versions -----------------------------------------------------------------------

# the distributions a GPU run's log should name, as `pip list` spells them
# (cupy-cuda13x, nvidia-cudnn-cu13, nvidia-cudnn-frontend, nvidia-nccl-cu13, ...)
RELEVANT = re.compile(r"^(numpy|numba|torch|cupy(-cuda\w+)?|"
                      r"nvidia-(cudnn|nccl|cublas|cuda-runtime|cuda-nvrtc)(-[a-z0-9]+)*)$")


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def relevant_packages(pairs):
    """The (name, version, where) triples of ``pairs`` whose name RELEVANT matches,
    sorted; ``pairs`` holds (name, version) or (name, version, where) tuples."""
    out = []
    for pair in pairs:
        name, version, where = (tuple(pair) + ("",))[:3]
        if RELEVANT.match(_normalized(name)):
            out.append((_normalized(name), version, where))
    return sorted(out)


def installed_packages():
    """(name, version, folder) of every distribution on sys.path -- PYTHONPATH's too,
    where gpu_check.sh installs the carried wheels."""
    from importlib import metadata
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            where = dist.locate_file("")
            yield name, dist.version, str(where)


def versions():
    """What the run is made of: ``tinynorm info``, the relevant packages, whether the
    cuDNN frontend imports (and its version), the GPU as nvidia-smi sees it."""
    from tinynorm.cli import main as cli_main
    cli_main(["info"])
    packages = relevant_packages(installed_packages())
    print("packages:")
    for name, version, where in packages:
        print(f"  {name} {version}  ({where})")
    try:
        import cudnn
        print(f"cuDNN frontend: {getattr(cudnn, '__version__', '?')} from "
              f"{Path(cudnn.__file__).parent}")
    except Exception as e:  # noqa: BLE001 -- reported: the cudnn plan needs it
        print(f"cuDNN frontend: does not import ({type(e).__name__}: {e})")
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ)
           if k.startswith(("TINYNORM_", "CUPY_", "CUDA_VISIBLE"))]
    print(f"environment: {', '.join(env) or 'no TINYNORM_ / CUPY_ variables'}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        print(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"nvidia-smi: not run ({type(e).__name__})")
    return {"packages": packages}


# -- one convolution per path ---------------------------------------------------------

def _conv_paths(device):
    """(label, settings) of each convolution path of ``device``: the default choice
    (cuDNN on a GPU with the frontend; a numba plan on the CPU) and ``generic``."""
    if device == "gpu":
        return [("default", {}), ("generic", dict(use_cudnn=False))]
    return [("default", {}), ("generic", dict(force_generic=True))]


def _misaligned(xp, a):
    """``a`` as a C-contiguous view starting one element (4 or 8 bytes) into its
    buffer: cuDNN needs 16-byte aligned pointers, so the cudnn plan must copy it."""
    flat = xp.empty(a.size + 1, dtype=a.dtype)
    view = flat[1:].reshape(a.shape)
    view[...] = a
    return view


def convs(device, small):
    """One convolution forward and backward per path and dtype for two geometries
    (a 3x3 stride-1 conv; the ImageNet stem's 7x7 stride 2 on 3 channels), and one
    float32 input that is not 16-byte aligned, each against the direct convolution
    on the CPU in float64.  Returns (rows, failures)."""
    geometries = ([((2, 8, 6, 6), (8, 8, 3, 3), 1, 1), ((2, 3, 12, 12), (4, 3, 7, 7), 2, 3)]
                  if small else
                  [((8, 64, 14, 14), (64, 64, 3, 3), 1, 1), ((4, 3, 64, 64), (64, 3, 7, 7), 2, 3)])
    xp = backend.xp_for(device)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    for g, (x_shape, w_shape, stride, pad) in enumerate(geometries):
        x = rng.standard_normal(x_shape)
        w = rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))
        b = rng.standard_normal(w_shape[0])
        y_ref, cache_ref = ops.conv2d_reference_forward(x, w, b, stride, pad)
        dy = rng.standard_normal(y_ref.shape)
        grads_ref = ops.conv2d_reference_backward(dy, cache_ref)
        cases = [(label, settings, np.dtype(dtype), False)
                 for label, settings in _conv_paths(device) for dtype in (np.float64, np.float32)]
        if g == 0:
            cases.append(("default", {}, np.dtype(np.float32), True))
        for label, settings, dtype, misaligned in cases:
            args = [backend.to_device(a.astype(dtype), device) for a in (x, w, b, dy)]
            if misaligned:
                args[0] = _misaligned(xp, args[0])
            with config.using(**settings):
                y, cache = ops.conv2d_forward(args[0], args[1], args[2], stride, pad)
                grads = ops.conv2d_backward(args[3], cache)
            error = max([rel_error(y, y_ref)]
                        + [rel_error(a, r) for a, r in zip(grads, grads_ref)])
            row = dict(geometry=f"x {x_shape} w {w_shape} s{stride} p{pad}", path=label,
                       dtype=dtype.name, misaligned=misaligned, algorithm=cache.plan.algorithm,
                       reason=cache.plan.reason, max_rel_error=error)
            rows.append(row)
            where = f"{row['geometry']} {label} {dtype.name}{' misaligned' * misaligned}"
            if error > TOL[dtype]:
                failures.append(f"{where}: error {error:.1e} > {TOL[dtype]:.0e}")
            if device == "gpu" and label == "default" and REQUIRE_CUDNN \
                    and cache.plan.algorithm != "cudnn":
                failures.append(f"{where}: ran {cache.plan.algorithm}, not cudnn, under "
                                f"TINYNORM_REQUIRE_CUDNN=1 ({cache.plan.reason})")
    print(f"{'geometry':<46}{'path':<9}{'dtype':<10}{'ran':<11}{'max rel err':>12}")
    for r in rows:
        dtype = r["dtype"] + ("*" if r["misaligned"] else "")
        print(f"{r['geometry']:<46}{r['path']:<9}{dtype:<10}{r['algorithm']:<11}"
              f"{r['max_rel_error']:>12.1e}")
    print("* a view one element into its buffer (not 16-byte aligned); errors: forward and "
          "every gradient against the CPU's direct float64 convolution, relative to the "
          "largest |value|")
    for reason in sorted({r["reason"] for r in rows if r["reason"]}):
        print(f"plan reason: {reason}")
    for f in failures:
        print(f"FAILED: {f}")
    print(f"convs: {len(failures)} FAILURE(S) in {len(rows)}" if failures
          else f"convs: all {len(rows)} ok")
    return rows, failures


def _model(name, norm, small, dtype=np.float32):
    if name == "cifar10_nv":
        kw = dict(in_channels=3, width=1 / 16 if small else 0.25)
        shape = (3, 28, 28)
    elif name == "resnet50":
        kw = dict(in_channels=3, width=1 / 32 if small else 0.25, stem="cifar")
        shape = (3, 16, 16) if small else (3, 32, 32)
    else:
        kw = dict(in_channels=1, depth=8 if small else 50, linear_width=16 if small else 64,
                  in_features=784)
        shape = (1, 28, 28)
    return build_model(name, norm, num_classes=10, seed=0, dtype=dtype,
                       opts=dict(bn_chunk=None), **kw), shape


def _step(model, opt, x, y):
    logits = model(x)
    loss, dlogits = ops.softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    opt.step()
    return float(loss)


def compare(device, small):
    """One SGD step of every model and norm, float32 on ``device`` vs float64 on
    the CPU: the loss, and the largest error of the parameter change relative
    to the largest change (the step is what the device computed)."""
    batch = 8 if small else 32
    rows, worst = [], 0.0
    cases = ([("cifar10_nv", n) for n in norm_names()] + [("resnet50", n) for n in norm_names()]
             + [("deep_linear", n) for n, e in NORM_REGISTRY.items() if e.linear_unit])
    for name, norm in cases:
        rng = np.random.default_rng(1)
        ref, shape = _model(name, norm, small, np.float64)
        x = rng.standard_normal((batch,) + shape)
        y = rng.integers(0, 10, batch)
        before = {k: np.array(v) for k, v in ref.parameters().items()}
        opt = SGD(ref, LRSchedule("constant", 0.01, 10), momentum=0.9)
        loss_ref = _step(ref, opt, x, y)
        model, _ = _model(name, norm, small)
        model.to(device)
        opt = SGD(model, LRSchedule("constant", 0.01, 10), momentum=0.9)
        t0 = time.perf_counter()
        loss = _step(model, opt, backend.to_device(x.astype(np.float32), device),
                     backend.to_device(y, device))
        backend.synchronize(device)
        seconds = time.perf_counter() - t0
        # over all parameters at once: a tensor whose step is rounding noise (a BN beta
        # behind another BN) has no meaningful error of its own
        diff = scale = 0.0
        for k, p in model.parameters().items():
            delta = backend.to_numpy(p).astype(np.float64) - before[k]
            delta_ref = np.array(ref.parameters()[k]) - before[k]
            diff = max(diff, float(np.abs(delta - delta_ref).max()))
            scale = max(scale, float(np.abs(delta_ref).max()))
        err = diff / max(scale, 1e-30)
        worst = max(worst, err)
        rows.append(dict(model=name, norm=norm, loss_cpu64=loss_ref, loss=loss,
                         step_rel_err=err, first_step_s=seconds))
    print(f"{'model':<12}{'norm':<10}{'loss cpu f64':>14}{'loss ' + device + ' f32':>14}"
          f"{'step err':>10}{'1st step s':>11}")
    for r in rows:
        print(f"{r['model']:<12}{r['norm']:<10}{r['loss_cpu64']:>14.6f}{r['loss']:>14.6f}"
              f"{r['step_rel_err']:>10.2e}{r['first_step_s']:>11.3f}")
    print(f"worst parameter-step error (float32 on {device} vs float64 CPU): {worst:.2e}")
    return rows


def _conv_vs_torch(device, small):
    n, c, hw = (8, 16, 8) if small else (128, 128, 28)
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((n, c, hw, hw)).astype(np.float32), device)
    w = backend.to_device((rng.standard_normal((c, c, 3, 3)) / (3 * np.sqrt(c)))
                          .astype(np.float32), device)
    reps = 3 if small else 20

    def ours():
        y, cache = ops.conv2d_forward(x, w, None, 1, 1)
        ops.conv2d_backward(y, cache)
        return cache.plan
    plan = ours()
    backend.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        ours()
    backend.synchronize(device)
    result = dict(shape=f"x {n}x{c}x{hw}x{hw}, w {c}x{c}x3x3, fwd+bwd",
                  path=plan.algorithm, tinynorm_ms=1e3 * (time.perf_counter() - t0) / reps)
    torch, tdev, why = _torch(device)
    if torch is None:
        result["torch"] = why
        return result
    tx = torch.tensor(backend.to_numpy(x), device=tdev, requires_grad=True)
    tw = torch.tensor(backend.to_numpy(w), device=tdev, requires_grad=True)

    def theirs():
        y = torch.nn.functional.conv2d(tx, tw, padding=1)
        y.backward(y.detach())
    theirs()
    _torch_sync(torch, tdev)
    t0 = time.perf_counter()
    for _ in range(reps):
        theirs()
    _torch_sync(torch, tdev)
    result["torch_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    result["torch"] = f"{torch.__version__} on {tdev}, cuDNN {torch.backends.cudnn.version()}"
    return result


# -- a training step against PyTorch + cuDNN ------------------------------------------

def _torch(device):
    """(torch, its device, "") with TF32 off, or (None, None, why not)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 -- an optional, benchmark-only dependency
        return None, None, f"not importable ({type(e).__name__})"
    if device == "gpu" and not torch.cuda.is_available():
        return None, None, f"{torch.__version__} sees no GPU"
    # tinynorm's precision policy (allow_tf32 off, CUPY_TF32 unset): float32 inputs,
    # float32 accumulation, no TF32 rounding in cuDNN convolutions or cuBLAS matmuls
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch, ("cuda" if device == "gpu" else "cpu"), ""


def _torch_sync(torch, tdev):
    if tdev == "cuda":
        torch.cuda.synchronize()


def _median_ms(step, sync, warmup, steps):
    """(median ms of ``steps`` timed calls of ``step`` after ``warmup`` untimed
    ones, the value the first call returned)."""
    first = step()
    for _ in range(warmup - 1):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), first


def _bench_configs(small):
    """(label, build_model keywords, input shape, batch, classes, warm-up, timed steps)."""
    if small:
        return [("cifar10-nv BN, width 1/16, batch 4, 3x28x28",
                 dict(name="cifar10_nv", width=1 / 16), (3, 28, 28), 4, 10, 1, 2),
                ("ResNet-50 BN, width 1/32, ImageNet stem, batch 4, 3x32x32",
                 dict(name="resnet50", width=1 / 32, stem="imagenet"), (3, 32, 32), 4, 1000,
                 1, 2)]
    return [("cifar10-nv BN, width 1, batch 128, 3x28x28",
             dict(name="cifar10_nv", width=1.0), (3, 28, 28), 128, 10, 2, 10),
            ("ResNet-50 BN, width 1, ImageNet stem, batch 64, 3x224x224",
             dict(name="resnet50", width=1.0, stem="imagenet"), (3, 224, 224), 64, 1000, 2, 5)]


def bench(device, small, save=lambda result: None):
    """A BN training step (forward, loss, backward, SGD with momentum) of cifar10-nv
    and ResNet-50 in tinynorm and in PyTorch on the same device, float32 without
    TF32 on both sides, the same weights and batch (PyTorch's model is made from
    tinynorm's by experiments/bench_vs_torch.py); the median step and the ratio
    tinynorm / PyTorch; the first step's loss of each (equal up to float32
    rounding: the same network); BN's share of tinynorm's ResNet-50 step
    (tinynorm.profile, the paper's Figure 1: about 1/4 on its GPU); a 3x3 conv.
    ``save(result)`` is called after each item, so a timeout keeps what finished."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_vs_torch as twin
    from tinynorm.profile import format_profile, profile_step

    torch, tdev, why_not = _torch(device)
    which = (f"{torch.__version__} on {tdev}, cuDNN {torch.backends.cudnn.version()}"
             if torch is not None else why_not)
    print(f"PyTorch: {which}; TF32 off in both (tinynorm allow_tf32="
          f"{config.get('allow_tf32')}, CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')})",
          flush=True)
    out = {}
    rng = np.random.default_rng(0)
    for label, kw, shape, batch, classes, warmup, steps in _bench_configs(small):
        kw = dict(kw)
        model = build_model(kw.pop("name"), "bn", in_channels=3, num_classes=classes, **kw)
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        y = rng.integers(0, classes, batch)
        row = dict(batch=batch, warmup=warmup, steps=steps)
        tmodel = twin.torch_twin(model, np.float32)[0] if torch is not None else None
        model.to(device)
        xd, yd = backend.to_device(x, device), backend.to_device(y, device)
        step = twin.tinynorm_stepper(model)
        row["tinynorm_ms"], row["tinynorm_first_loss"] = _median_ms(
            lambda: step(xd, yd), lambda: backend.synchronize(device), warmup, steps)
        line = f"{label}: tinynorm {row['tinynorm_ms']:.1f} ms/step"
        if tmodel is not None:
            tmodel = tmodel.to(tdev)
            tx, ty = (t.to(tdev) for t in twin.torch_input(x, y, False))
            tstep = twin.torch_stepper(tmodel, False)
            row["torch_ms"], row["torch_first_loss"] = _median_ms(
                lambda: tstep(tx, ty), lambda: _torch_sync(torch, tdev), warmup, steps)
            row["ratio"] = row["tinynorm_ms"] / row["torch_ms"]
            line += (f", PyTorch {row['torch_ms']:.1f} ms/step, ratio {row['ratio']:.2f} "
                     f"(tinynorm / PyTorch); first loss {row['tinynorm_first_loss']:.5f} vs "
                     f"{row['torch_first_loss']:.5f}")
            del tmodel, tstep, tx, ty
            if tdev == "cuda":
                torch.cuda.empty_cache()
        else:
            line += f"; PyTorch {why_not}"
        print(line, flush=True)
        if kw.get("stem") == "imagenet":
            profile = profile_step(model, xd, yd, steps=steps if small else 3, warmup=1)
            total = profile["total"]
            row["profile"] = profile
            row["bn_share"] = profile["by_category"]["batch norm"] / total
            print(f"{label}, tinynorm by layer type (every layer timed between device "
                  f"synchronizations):\n{format_profile(profile)}\n"
                  f"BN's share of the step: {100 * row['bn_share']:.1f}% (the paper's "
                  f"Figure 1: about 25%)", flush=True)
        out[label] = row
        save(out)
        del model, step, xd, yd
        if device == "gpu":
            backend.cupy.get_default_memory_pool().free_all_blocks()
    conv = _conv_vs_torch(device, small)
    out["conv3x3"] = conv
    torch_part = (f"torch {conv['torch_ms']:.2f} ms ({conv['torch']})" if "torch_ms" in conv
                  else f"torch {conv['torch']}")
    print(f"3x3 conv {conv['shape']}: tinynorm {conv['tinynorm_ms']:.2f} ms "
          f"(plan {conv['path']}), {torch_part}")
    save(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("versions", "convs", "compare", "bench"))
    p.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    def save(result):
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    if args.what == "versions":          # whatever the device: it says what is missing
        save(versions())
        return 0
    try:
        backend.check_device(args.device)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 3
    backend.tune_allocator()
    print(f"device {args.device}; config: allow_tf32={config.get('allow_tf32')}, "
          f"use_cudnn={config.get('use_cudnn')}; TINYNORM_REQUIRE_CUDNN={int(REQUIRE_CUDNN)}",
          flush=True)
    if args.what == "convs":
        rows, failures = convs(args.device, args.small)
        save(dict(rows=rows, failures=failures))
        return 1 if failures else 0
    if args.what == "compare":
        save(compare(args.device, args.small))
        return 0
    bench(args.device, args.small, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python half of experiments/gpu_check.sh: a training-step comparison and a
small benchmark, each printing one compact block of results.

    python experiments/gpu_check.py compare      # a training step of each model, GPU vs CPU
    python experiments/gpu_check.py bench        # cifar10-nv and ResNet-50 steps, a 3x3 conv vs torch

``--device cpu --small`` runs the same code on the CPU at tiny sizes (how it is
tested on machines without a GPU; the numbers then mean nothing).  Exit status
3 when the device is not usable.
"""
import argparse
import json
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


def _time_steps(model, x, y, steps, device):
    opt = SGD(model, LRSchedule("constant", 1e-3, 10**6), momentum=0.9)
    _step(model, opt, x, y)                      # warm-up: kernel compiles, cuDNN graph builds
    backend.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, opt, x, y)
    backend.synchronize(device)
    return (time.perf_counter() - t0) / steps


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
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        result["torch"] = f"not importable ({type(e).__name__})"
        return result
    tdev = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
    # the same precision policy as tinynorm's default: no TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    tx = torch.tensor(backend.to_numpy(x), device=tdev, requires_grad=True)
    tw = torch.tensor(backend.to_numpy(w), device=tdev, requires_grad=True)

    def theirs():
        y = torch.nn.functional.conv2d(tx, tw, padding=1)
        y.backward(y.detach())
    theirs()
    if tdev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        theirs()
    if tdev == "cuda":
        torch.cuda.synchronize()
    result["torch_ms"] = 1e3 * (time.perf_counter() - t0) / reps
    result["torch"] = f"{torch.__version__} on {tdev}, cuDNN {torch.backends.cudnn.version()}"
    return result


def bench(device, small):
    steps = 2 if small else 10
    out = {}
    rng = np.random.default_rng(0)
    for label, name, batch in (("cifar10-nv BN, width 1, 3x28x28", "cifar10_nv", 128),
                               ("ResNet-50 BN, width 1, CIFAR stem 3x32x32", "resnet50", 64)):
        if small:
            model, shape = _model(name, "bn", True)
            batch = 8
        elif name == "cifar10_nv":
            model = build_model(name, "bn", in_channels=3, num_classes=10, width=1.0)
            shape = (3, 28, 28)
        else:
            model = build_model(name, "bn", in_channels=3, num_classes=10, width=1.0,
                                stem="cifar")
            shape = (3, 32, 32)
        model.to(device)
        x = backend.to_device(rng.standard_normal((batch,) + shape).astype(np.float32), device)
        y = backend.to_device(rng.integers(0, 10, batch), device)
        seconds = _time_steps(model, x, y, steps, device)
        out[label] = dict(batch=batch, ms_per_step=1e3 * seconds, images_per_s=batch / seconds)
        print(f"{label}: batch {batch}, {1e3 * seconds:.1f} ms/step, "
              f"{batch / seconds:.0f} images/s", flush=True)
    conv = _conv_vs_torch(device, small)
    out["conv3x3"] = conv
    torch_part = (f"torch {conv['torch_ms']:.2f} ms ({conv['torch']})" if "torch_ms" in conv
                  else f"torch {conv['torch']}")
    print(f"3x3 conv {conv['shape']}: tinynorm {conv['tinynorm_ms']:.2f} ms "
          f"(plan {conv['path']}), {torch_part}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("compare", "bench"))
    p.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    try:
        backend.check_device(args.device)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 3
    backend.tune_allocator()
    print(f"device {args.device}; config: allow_tf32={config.get('allow_tf32')}, "
          f"use_cudnn={config.get('use_cudnn')}")
    result = (compare if args.what == "compare" else bench)(args.device, args.small)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's time goes, by layer type (the paper's Figure 1).

Every leaf layer's ``forward`` and ``backward`` is wrapped with a timer for
the duration of the measurement; the time of a full step (forward, loss,
backward, SGD update) is measured around it, and whatever no leaf accounts
for (loss, optimizer, residual sums, Python glue) is reported as "other".
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from . import backend, ops
from .nn import skip_input_grad
from .optim import SGD, LRSchedule

__all__ = ["CATEGORIES", "categories", "category_of", "profile_step", "format_profile"]

CATEGORIES = ("convolution", "batch norm", "relu", "pooling", "other")

# layer classes every model shares; each normalization's registry entry adds its
# own (tinynorm.norms.Norm.profile_categories)
_BASE_CLASSES = {
    "Conv2d": "convolution", "ReLU": "relu",
    "MaxPool2d": "pooling", "AvgPool2d": "pooling", "GlobalAvgPool2d": "pooling",
}


def _class_categories() -> dict:
    from .norms import NORM_REGISTRY
    table = dict(_BASE_CLASSES)
    for entry in NORM_REGISTRY.values():
        table.update(entry.profile_categories)
    return table


def categories() -> tuple:
    """CATEGORIES, then any further category a registered norm names, before "other"."""
    extra = [c for c in dict.fromkeys(_class_categories().values()) if c not in CATEGORIES]
    return CATEGORIES[:-1] + tuple(extra) + ("other",)


def category_of(layer) -> str:
    return _class_categories().get(type(layer).__name__, "other")


def _leaves(model):
    return [layer for _, layer in model.named_layers() if not layer.children]


def profile_step(model, x, y, steps=3, warmup=1, lr=1e-3, tune_allocator=True):
    """Time ``steps`` training steps of ``model`` on the batch ``(x, y)``.

    Returns ``{"total": seconds per step, "by_category": {category: seconds
    per step}, "by_class": {layer class: seconds per step}, "by_pass":
    {category: {"forward": s, "backward": s}}}``; "other" is the total minus
    the time inside the timed leaves (its "by_pass" entry holds only the
    leaves').  Parameters change (SGD with a small lr) as in real training.
    ``tune_allocator``: call :func:`tinynorm.backend.tune_allocator` first
    (process-wide), so that the step is timed as the trainer runs it, without
    page faults on every fresh activation.  The model's first layer skips
    its input gradient from then on (:func:`tinynorm.nn.skip_input_grad`), as
    in the trainer.
    """
    if tune_allocator:
        backend.tune_allocator()
    skip_input_grad(model)      # as the trainer does
    device = model.device
    opt = SGD(model, LRSchedule("constant", lr, 10**9), momentum=0.9)
    timings = defaultdict(float)
    pass_timings = defaultdict(float)
    originals = []
    for layer in _leaves(model):
        name = type(layer).__name__
        for method in ("forward", "backward"):
            fn = getattr(layer, method)

            def timed(arg, _fn=fn, _name=name, _method=method):
                backend.synchronize(device)
                t0 = time.perf_counter()
                out = _fn(arg)
                backend.synchronize(device)
                dt = time.perf_counter() - t0
                timings[_name] += dt
                pass_timings[(_name, _method)] += dt
                return out
            originals.append((layer, method))
            setattr(layer, method, timed)

    def step():
        logits = model(x)
        _, dlogits = ops.softmax_cross_entropy(logits, y)
        model.backward(dlogits)
        opt.step()

    try:
        model.train()
        for _ in range(warmup):
            step()
        timings.clear()
        pass_timings.clear()
        backend.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        backend.synchronize(device)
        total = (time.perf_counter() - t0) / steps
    finally:
        for layer, method in originals:
            delattr(layer, method)   # back to the class method
    by_class = {k: v / steps for k, v in timings.items()}
    table, cats = _class_categories(), categories()
    by_category = {c: 0.0 for c in cats}
    for cls, t in by_class.items():
        by_category[table.get(cls, "other")] += t
    by_category["other"] += max(total - sum(by_class.values()), 0.0)
    by_pass = {c: {"forward": 0.0, "backward": 0.0} for c in cats}
    for (cls, method), t in pass_timings.items():
        by_pass[table.get(cls, "other")][method] += t / steps
    return {"total": total, "by_category": by_category, "by_class": by_class,
            "by_pass": by_pass}


def format_profile(result) -> str:
    total = result["total"]
    by_pass = result.get("by_pass")
    head = f"{'layer type':<14}{'ms/step':>10}{'share':>9}"
    lines = [head + (f"{'forward':>10}{'backward':>10}" if by_pass else "")]
    for cat in result["by_category"]:
        t = result["by_category"][cat]
        line = f"{cat:<14}{1e3 * t:>10.1f}{100 * t / total:>8.1f}%"
        if by_pass:
            line += f"{1e3 * by_pass[cat]['forward']:>10.1f}{1e3 * by_pass[cat]['backward']:>10.1f}"
        lines.append(line)
    lines.append(f"{'total':<14}{1e3 * total:>10.1f}{100.0:>8.1f}%")
    return "\n".join(lines)

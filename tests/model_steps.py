"""Shared by test_generic_paths.py and test_gpu.py: every model with every norm
it has, and a few SGD steps of one on seeded random batches."""
import numpy as np

from tinynorm import backend, ops
from tinynorm.models import build_model
from tinynorm.norms import NORM_REGISTRY, norm_names
from tinynorm.optim import SGD, LRSchedule

MODEL_CASES = (
    [("cifar10_nv", n) for n in norm_names()]
    + [("resnet50", n) for n in norm_names()]
    + [("deep_linear", n) for n, e in NORM_REGISTRY.items() if e.linear_unit is not None])
CASE_IDS = [f"{m}-{n}" for m, n in MODEL_CASES]


def sgd_steps(model_name, norm, model_kw, *, batch, steps=2, dtype=np.float64, device="cpu"):
    """``steps`` SGD steps (lr 0.01, momentum 0.9, weight decay 1e-3) of the
    model built from ``model_kw`` (its ``input`` is the sample shape) on
    ``device``, on batches drawn from default_rng(11); returns (losses, model,
    optimizer)."""
    kw = dict(model_kw)
    shape = kw.pop("input")
    model = build_model(model_name, norm, num_classes=10, seed=3, dtype=dtype,
                        opts=dict(bn_chunk=None), **kw).to(device)
    opt = SGD(model, LRSchedule("constant", 0.01, 10), momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(11)
    losses = []
    for _ in range(steps):
        x = backend.to_device(rng.standard_normal((batch,) + shape).astype(dtype), device)
        y = backend.to_device(rng.integers(0, 10, batch), device)
        loss, dlogits = ops.softmax_cross_entropy(model(x), y)
        model.backward(dlogits)
        opt.step()
        losses.append(float(loss))
    return losses, model, opt

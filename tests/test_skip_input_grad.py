"""tinynorm.nn.skip_input_grad: a network's first convolution skips the
gradient of the network's input (training never uses it), and every
parameter gradient stays what it was, bit for bit."""
import numpy as np
import pytest

from model_steps import CASE_IDS, MODEL_CASES
from tinynorm import nn, ops
from tinynorm.models import build_model
from tinynorm.models.blocks import Bottleneck

MODEL_KW = {
    "cifar10_nv": dict(in_channels=3, width=1 / 16, input=(3, 28, 28)),
    "resnet50": dict(in_channels=3, width=1 / 32, stem="cifar", input=(3, 16, 16)),
}
IMAGE_CASES = [(c, i) for c, i in zip(MODEL_CASES, CASE_IDS) if c[0] in MODEL_KW]


def _grads(model_name, norm, skip, monkeypatch):
    kw = dict(MODEL_KW[model_name])
    shape = kw.pop("input")
    model = build_model(model_name, norm, num_classes=10, seed=3, dtype=np.float64, **kw)
    first = nn.skip_input_grad(model) if skip else None
    data_passes = []
    backward = ops.conv2d_backward
    monkeypatch.setattr(ops, "conv2d_backward",
                        lambda dy, cache: data_passes.append(1) or backward(dy, cache))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4,) + shape)
    loss, dlogits = ops.softmax_cross_entropy(model(x), rng.integers(0, 10, 4))
    dx = model.backward(dlogits)
    return first, dx, len(data_passes), {k: v.copy() for k, v in model.gradients().items()}


@pytest.mark.parametrize("model_name,norm", [c for c, _ in IMAGE_CASES],
                         ids=[i for _, i in IMAGE_CASES])
def test_the_first_convolution_skips_the_input_gradient_only(model_name, norm, monkeypatch):
    _, dx0, passes0, g0 = _grads(model_name, norm, False, monkeypatch)
    first, dx1, passes1, g1 = _grads(model_name, norm, True, monkeypatch)
    assert isinstance(first, (nn.Conv2d, nn.WNConv2d)) and first.input_grad is False
    assert dx0 is not None and dx0.shape[1] == 3 and dx1 is None
    assert passes1 == passes0 - 1                  # one backward-data pass fewer
    assert g1.keys() == g0.keys()
    for k in g0:
        assert np.array_equal(g1[k], g0[k]), k


def test_only_a_layer_reached_through_first_children_is_switched():
    rng = np.random.default_rng(5)
    # a residual block first: its input also feeds the shortcut, so nothing is skipped
    block = Bottleneck("bn", 8, 4, 8, rng=rng, dtype=np.float64)
    assert nn.skip_input_grad(nn.Sequential(block)) is None
    assert nn.skip_input_grad(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None
    conv = nn.Conv2d(3, 4, 3, rng=rng, dtype=np.float64)
    assert nn.skip_input_grad(conv) is None and conv.input_grad   # not inside a Sequential
    assert nn.skip_input_grad(nn.Sequential(nn.Sequential(conv, nn.ReLU()))) is conv
    assert conv.input_grad is False

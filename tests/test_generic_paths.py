"""The array-generic code that CuPy arrays run, held to the fast CPU paths on NumPy.

``config.using(force_generic=True)`` sends NumPy arrays down exactly the
branches CuPy arrays take (the ``generic`` convolution plan, every op's array
expressions, no numba kernel).  Every op's forward and backward, and a
training step of every model with every norm it has, must agree with the
default (numba / Winograd / fused-BN) CPU paths to 1e-8 in float64 -- so the
code a GPU runs is tested on machines without one.
"""
import numpy as np
import pytest

from tinynorm import config, ops
from tinynorm.backend import is_array
from tinynorm.selfcheck import all_cases

from model_steps import CASE_IDS, MODEL_CASES, sgd_steps

RTOL = ATOL = 1e-8
# the fast side: fused BN kernels even for the tiny test shapes
FAST = dict(bn_fused_min_size=0)
GENERIC = dict(force_generic=True)

CASES = all_cases()


def _run_case(forward, backward, args, settings):
    with config.using(**settings):
        out, cache = forward(*args)
        rng = np.random.default_rng(7)
        dy = rng.standard_normal(out.shape) if is_array(out) and out.ndim else 1.0
        grads = backward(dy, cache)
    return out, grads


def _close(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_op_generic_branch_matches_the_fast_path(case):
    label, forward, backward, args, names = case
    assert all(not is_array(a) or a.dtype in (np.float64, np.int64) for a in args)
    y_fast, g_fast = _run_case(forward, backward, args, FAST)
    y_gen, g_gen = _run_case(forward, backward, args, GENERIC)
    _close(y_gen, y_fast, f"{label}: forward")
    assert len(g_gen) == len(g_fast)
    for i, (a, b) in enumerate(zip(g_gen, g_fast)):
        _close(a, b, f"{label}: gradient {i}")


def test_force_generic_takes_the_branches_cupy_takes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 6, 6))
    w = rng.standard_normal((16, 16, 3, 3))
    g, b = np.ones(16), np.zeros(16)
    with config.using(**FAST):
        assert ops.conv2d_forward(x, w, None, 1, 1)[1].plan.algorithm in ("winograd4", "winograd2")
        assert ops.batch_norm_forward(x, g, b, 1e-5)[1].fused
        assert ops.max_pool2d_forward(x, 2, 2, 0)[1][0] == "numba"
    with config.using(**GENERIC):
        assert ops.conv2d_forward(x, w, None, 1, 1)[1].plan.algorithm == "generic"
        assert not ops.batch_norm_forward(x, g, b, 1e-5)[1].fused
        assert ops.max_pool2d_forward(x, 2, 2, 0)[1][0] == "generic"
        assert ops.avg_pool2d_forward(x, 2, 2, 0)[1][0] == "generic"
        # on CuPy arrays force_generic skips cuDNN too: the same generic plan
        plan = ops.conv_plan(x.shape, w.shape, 1, 1, np.float64, backend="gpu")
        assert plan.algorithm == "generic" and plan.reason == "force_generic is on"
        assert not plan.fallback
    assert not config.numba_enabled(config.Settings(force_generic=True))
    assert not config.numba_enabled(config.Settings(use_numba=False))
    assert config.numba_enabled(config.Settings())


# every model with every norm it has (model_steps.MODEL_CASES), at tiny sizes, float64
MODEL_KW = {
    "cifar10_nv": dict(in_channels=3, width=1 / 16, input=(3, 28, 28)),
    "resnet50": dict(in_channels=3, width=1 / 32, stem="cifar", input=(3, 16, 16)),
    "deep_linear": dict(in_channels=1, depth=6, linear_width=8, in_features=36,
                        input=(1, 6, 6)),
}


def _train_steps(model_name, norm, settings, steps=2):
    """Two SGD steps (momentum, weight decay) on fixed batches; returns the
    losses, the last gradients and the parameters after the steps."""
    with config.using(**settings):
        losses, model, _ = sgd_steps(model_name, norm, MODEL_KW[model_name], batch=4,
                                     steps=steps)
    grads = {k: np.array(v) for k, v in model.gradients().items()}
    params = {k: np.array(v) for k, v in model.parameters().items()}
    buffers = {k: np.array(v) for k, v in model.state_dict().items() if k not in params}
    return losses, grads, params, buffers


@pytest.mark.parametrize("model_name,norm", MODEL_CASES, ids=CASE_IDS)
def test_training_step_on_generic_branches_matches_the_fast_path(model_name, norm):
    fast = _train_steps(model_name, norm, FAST)
    generic = _train_steps(model_name, norm, GENERIC)
    assert np.all(np.isfinite(fast[0])), fast[0]
    np.testing.assert_allclose(generic[0], fast[0], rtol=RTOL, atol=ATOL, err_msg="losses")
    for group, (a, b) in zip(("gradient", "parameter", "buffer"), zip(generic[1:], fast[1:])):
        assert a.keys() == b.keys(), group
        assert a or group == "buffer", group       # only BN-style norms have buffers
        for name in a:
            _close(a[name], b[name], f"{model_name}/{norm}: {group} {name}")

"""A layer and its ReLU as one forward (the ``fuse_relu`` setting, tinynorm.nn.base).

Fusing changes where the ReLU is computed, never what: every fused op gives
the bits of the op followed by ``relu_forward`` (NaN included), the ReLU's
cache is what ``relu_forward`` would keep, and whole training steps of every
image model x norm are bit-identical with the setting on and off, in both
memory layouts and, for float32, on oneDNN (the ReLU as its post-op).
"""
import os

import numpy as np
import pytest

from model_steps import CASE_IDS, MODEL_CASES, sgd_steps
from tinynorm import nn, ops, settings
from tinynorm.diagnostics import SignalRecorder
from tinynorm.ops import layout
from tinynorm.ops._elementwise import add_relu
from tinynorm.ops.conv import onednn

cl = layout.to_channels_last
ONEDNN_OK, ONEDNN_WHY = onednn.status()
if os.environ.get("TINYNORM_REQUIRE_ONEDNN") == "1" and not ONEDNN_OK:
    raise RuntimeError(f"TINYNORM_REQUIRE_ONEDNN=1 but {ONEDNN_WHY}")
needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason=ONEDNN_WHY)


def relu(a):
    return ops.relu_forward(a)[0]


def same(a, b):
    """Equal bits up to the sign of zero (NaN where NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def with_nan(x):
    x = x.copy(order="K")
    x.reshape(-1)[3] = np.nan if x.flags.c_contiguous else np.nan
    layout.flat(x)[5] = np.nan
    return x


# ----------------------------------------------------------------------------
# the fused ops against the op followed by relu_forward
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_inplace_writes_relu_forward_into_the_same_memory(dtype, channels_last):
    x = np.random.default_rng(0).standard_normal((3, 5, 6, 7)).astype(dtype)
    x = with_nan(cl(x) if channels_last else x)
    want = relu(x)
    for numba_on in (True, False):
        y = x.copy(order="K")
        with settings.using(use_numba=numba_on):
            z = ops.relu_inplace(y)
        assert z is y and same(z, want)
    strided = x.copy()[:, :, ::2]                  # neither layout: NumPy's maximum
    z = ops.relu_inplace(strided)
    assert z is strided and same(z, relu(x.copy()[:, :, ::2]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_backward_inplace_writes_relu_backward_into_dy(dtype, channels_last):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 5, 6, 7)).astype(dtype)
    x = with_nan(cl(x) if channels_last else x)
    y = relu(x)
    dy = with_nan(rng.standard_normal(x.shape).astype(dtype))     # NCHW: paired by layout
    dy = cl(dy) if channels_last else dy
    (want,) = ops.relu_backward(dy, y)
    for numba_on in (True, False):
        d = dy.copy(order="K")
        with settings.using(use_numba=numba_on):
            (got,) = ops.relu_backward_inplace(d, y)
        assert got is d and same(got, want)
    d = layout.to_nchw(dy).copy() if channels_last else cl(dy)    # the other layout: a copy
    (got,) = ops.relu_backward_inplace(d, y)
    assert same(got, want)


@needs_onednn
def test_a_fused_onednn_convolution_keeps_nan():
    # NaN must reach the loss of a diverging network: oneDNN's ReLU post-op
    # would turn a NaN pre-activation into 0, so the layer does not use it
    rng = np.random.default_rng(2)
    x = cl(rng.standard_normal((2, 16, 6, 6)).astype(np.float32))
    x[0, 3, 2, 2] = np.nan                                 # poisons every output it feeds
    conv = nn.Conv2d(16, 16, 3, 1, 1, rng=rng, dtype=np.float32)
    y = conv(x)
    assert conv._cache.plan.algorithm == "onednn"
    z = nn.Sequential(conv, nn.ReLU())(x)
    assert np.isnan(z).sum() == np.isnan(y).sum() > 0 and same(z, relu(y))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("channels_last,min_size", [(True, 0), (False, 0), (False, 1 << 30)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_batch_norm_relu_forward_is_relu_of_batch_norm(dtype, channels_last, min_size, chunk):
    # channels-last: the kernel's fused pass; NCHW: the numba kernels or the
    # array code (bn_fused_min_size), each with the ReLU in place
    rng = np.random.default_rng(3)
    x = (3 * rng.standard_normal((4, 5, 6, 7)) + 1).astype(dtype)
    x = with_nan(cl(x) if channels_last else x)
    gamma = rng.standard_normal(5).astype(dtype)
    beta = rng.standard_normal(5).astype(dtype)
    with settings.using(bn_fused_min_size=min_size):
        assert ops.uses_channels_last_kernel(x) == channels_last
        y, cache = ops.batch_norm_forward(x, gamma, beta, 1e-5, chunk)
        z, zcache = ops.batch_norm_relu_forward(x, gamma, beta, 1e-5, chunk)
        assert same(z, relu(y)) and (y < 0).any()
        assert layout.is_channels_last(z) == layout.is_channels_last(y)
        assert same(zcache.batch_mean, cache.batch_mean) and same(zcache.batch_var, cache.batch_var)
        dz = rng.standard_normal(z.shape).astype(dtype)
        (dy,) = ops.relu_backward(dz, z)
        for got, want in zip(ops.batch_norm_backward(dy, zcache), ops.batch_norm_backward(dy, cache)):
            assert same(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_add_relu_is_relu_of_the_sum_in_every_layout(dtype):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    b = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    a = with_nan(a)
    for x, y in [(a, b), (cl(a), cl(b)), (a, cl(b))]:
        s = add_relu(x, y)
        assert same(s, relu(a + b))
        if layout.is_channels_last(x) and layout.is_channels_last(y):
            assert layout.is_channels_last(s)
    with settings.using(use_numba=False):
        assert same(add_relu(cl(a), cl(b)), relu(a + b))


# ----------------------------------------------------------------------------
# layers: when the pair fuses, and that nothing observable changes
# ----------------------------------------------------------------------------

class Spy(nn.ReLU):
    """A ReLU subclass: not declared fusable, so it runs its own forward."""
    calls = 0

    def forward(self, x):
        Spy.calls += 1
        return super().forward(x)


class MyConv(nn.Conv2d):
    """A Conv2d subclass that changes forward: must not be fused."""

    def forward(self, x):
        return super().forward(x) - 1.0


def test_sequential_fuses_only_declared_pairs_and_keeps_the_relu_cache():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 6))
    conv = nn.Conv2d(3, 4, 3, 1, 1, rng=rng, dtype=np.float64)
    act = nn.ReLU()
    seq = nn.Sequential(conv, act)
    calls = []
    conv.forward_relu = lambda x, _f=conv.forward_relu: calls.append(1) or _f(x)
    z = seq(x)
    assert calls == [1]
    assert act._cache is z                          # the cache relu_forward would keep
    with settings.using(fuse_relu=False):
        z0 = seq(x)
    assert calls == [1] and same(z, z0)
    # an observed producer is not fused: its output norm is the pre-ReLU one
    conv.track_output_norm = True
    seq(x)
    assert calls == [1]
    y, _ = ops.conv2d_forward(x, conv.params["w"], conv.params["b"], 1, 1)
    assert conv.output_norm == pytest.approx(float(np.sqrt((y ** 2).sum())), rel=1e-12)
    # subclasses are not fused (their forward may differ)
    Spy.calls = 0
    mine = MyConv(3, 4, 3, 1, 1, rng=np.random.default_rng(6), dtype=np.float64)
    z = nn.Sequential(mine, Spy())(x)
    y, _ = ops.conv2d_forward(x, mine.params["w"], mine.params["b"], 1, 1)
    assert Spy.calls == 1 and same(z, relu(y - 1.0))


def test_relu_backward_writes_into_dy_only_after_a_fresh_gradient():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 6, 6))
    conv = nn.Conv2d(3, 3, 3, 1, 1, rng=rng, dtype=np.float64)
    # ReLU then Identity: the dy the ReLU gets is the caller's, which it must not touch
    seq = nn.Sequential(conv, nn.ReLU(), nn.Identity())
    z = seq(x)
    dz = rng.standard_normal(z.shape)
    keep = dz.copy()
    seq.backward(dz)
    assert np.array_equal(dz, keep)
    # ReLU then a convolution: the ReLU writes into the convolution's new dx
    act, conv2 = nn.ReLU(), nn.Conv2d(3, 3, 3, 1, 1, rng=rng, dtype=np.float64)
    seq = nn.Sequential(conv, act, conv2)
    z = seq(x)
    returned = []
    backward = conv2.backward
    conv2.backward = lambda d: returned.append(backward(d)) or returned[-1]
    seen = []
    inner = conv.backward
    conv.backward = lambda d: seen.append(d) or inner(d)
    dx = seq.backward(np.ones(z.shape))
    assert seen[0] is returned[0]                   # the same array, written in place
    with settings.using(fuse_relu=False):
        seq(x)
        dx0 = seq.backward(np.ones(z.shape))
    assert same(dx, dx0) and same(seen[1], seen[0])


MODEL_KW = {
    "cifar10_nv": dict(in_channels=3, width=1 / 16, input=(3, 28, 28)),
    "resnet50": dict(in_channels=3, width=1 / 32, stem="cifar", input=(3, 16, 16)),
}
IMAGE_CASES = [(c, i) for c, i in zip(MODEL_CASES, CASE_IDS) if c[0] in MODEL_KW]


def _steps(model_name, norm, dtype, **overrides):
    with settings.using(bn_fused_min_size=0, **overrides):
        losses, model, _ = sgd_steps(model_name, norm, MODEL_KW[model_name], batch=4,
                                     dtype=dtype)
        model.eval()
        x = np.random.default_rng(7).standard_normal((2,) + MODEL_KW[model_name]["input"])
        with SignalRecorder(model) as rec:
            out = model(x.astype(dtype))
    state = {k: np.array(v) for k, v in model.state_dict().items()}
    return losses, state, rec.rms, out


@pytest.mark.parametrize("model_name,norm", [c for c, _ in IMAGE_CASES],
                         ids=[i for _, i in IMAGE_CASES])
def test_training_steps_are_bit_identical_with_and_without_fusion(model_name, norm,
                                                                  monkeypatch):
    calls = []
    relu_forward = ops.relu_forward
    monkeypatch.setattr(ops, "relu_forward", lambda x: calls.append(1) or relu_forward(x))
    configs = [(np.float64, dict(channels_last=False)), (np.float64, dict(channels_last=True))]
    if ONEDNN_OK:
        configs.append((np.float32, dict(use_onednn=True, channels_last=True)))
    for dtype, kw in configs:
        calls.clear()
        l0, s0, rms0, out0 = _steps(model_name, norm, dtype, fuse_relu=False, **kw)
        unfused = len(calls)
        calls.clear()
        l1, s1, rms1, out1 = _steps(model_name, norm, dtype, fuse_relu=True, **kw)
        # every nn.ReLU of these models follows a fusable layer or a residual sum
        assert len(calls) == 0 and (unfused > 0) == (norm in ("none", "bn", "wn")), unfused
        assert l1 == l0, (dtype, kw)
        assert s1.keys() == s0.keys()
        for k in s0:                                  # parameters and BN running stats
            assert same(s1[k], s0[k]), (k, dtype, kw)
        assert rms1 == rms0 and same(out1, out0)      # eval mode, signal hooks


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_layers_pass_float64_finite_differences(channels_last):
    # the fused forwards (conv / BN + ReLU, sum + ReLU) and the in-place ReLU
    # backward, checked by finite differences rather than against the unfused path
    from tinynorm.gradcheck import gradcheck_layer
    from tinynorm.models.blocks import Bottleneck
    rng = np.random.default_rng(12)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, rng=rng, dtype=np.float64),
                        nn.BatchNorm(4, dtype=np.float64), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, 1, 1, rng=rng, dtype=np.float64), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 2, 1, rng=rng, dtype=np.float64))
    block = nn.Sequential(Bottleneck("bn", 4, 2, 4, rng=rng, dtype=np.float64))
    with settings.using(channels_last=channels_last, bn_fused_min_size=0):
        for layer, shape in ((seq, (2, 3, 6, 6)), (block, (2, 4, 5, 5))):
            x = rng.standard_normal(shape)
            x = cl(x) if channels_last else x
            results = gradcheck_layer(layer, x, rtol=1e-5, atol=1e-7)
            assert results and all(r.passed for r in results)

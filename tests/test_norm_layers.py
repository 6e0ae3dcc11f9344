"""Normalization layers: gradients of inputs and every parameter (float64,
rtol 1e-6), running statistics, eval mode, WN initialization and
data-dependent init."""
import math

import numpy as np
import pytest

from tinynorm import nn, norms
from tinynorm.gradcheck import gradcheck_layer
from tinynorm.nn import norm

RTOL = 1e-6  # never loosen


def _unit(name, *args, rng=None, dtype=np.float32):
    """A conv -> norm -> activation unit as the models build it (the registry's)."""
    return norms.conv_unit(name, *args, rng=rng if rng is not None else np.random.default_rng(0),
                           dtype=dtype)


class _Flat(nn.Layer):
    """Exposes every parameter of a (composite) layer by its full name.

    ``gradcheck_layer`` checks ``layer.params`` only, which for a Sequential or
    a NormProp unit is empty (the parameters live in the children).  This
    adapter pushes its (float64) params into the children before each forward
    and collects the children's grads after each backward.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.slots = {name: (layer, key) for name, layer, key in inner.named_parameters()}
        self.params = {name: layer.params[key] for name, (layer, key) in self.slots.items()}

    def forward(self, x):
        for name, (layer, key) in self.slots.items():
            layer.params[key] = self.params[name]
        return self.inner.forward(x)

    def backward(self, dy):
        dx = self.inner.backward(dy)
        self.grads = {name: layer.grads[key] for name, (layer, key) in self.slots.items()}
        return dx


def _check(layer, x):
    flat = _Flat(layer)
    results = gradcheck_layer(flat, x, rtol=RTOL)
    assert len(results) == 1 + len(layer.parameters())
    assert all(r.passed for r in results)


def _x(rng, shape, scale=1.5, shift=0.3):
    return rng.standard_normal(shape) * scale + shift


def _f64(layer):
    """Layers are built float32 (the training dtype); gradcheck_layer converts
    the params, this converts the buffers too."""
    for _, sub in layer.named_layers():
        for k in sub.buffers:
            sub.buffers[k] = sub.buffers[k].astype(np.float64)
    return layer


# -- gradients ------------------------------------------------------------------------

LAYER_CASES = [
    ("BatchNorm 4-D", lambda: norm.BatchNorm(3), (6, 3, 4, 4)),
    ("BatchNorm 2-D", lambda: norm.BatchNorm(5), (10, 5)),
    ("BatchNorm chunk=2", lambda: norm.BatchNorm(3, chunk=2), (6, 3, 4, 4)),
    ("BatchNorm no affine", lambda: norm.BatchNorm(3, affine=False), (6, 3, 3, 3)),
    ("MeanOnlyBatchNorm", lambda: norm.MeanOnlyBatchNorm(3, chunk=3), (6, 3, 3, 3)),
    ("LayerNorm", lambda: norm.LayerNorm(4), (3, 4, 3, 3)),
    ("GroupNorm G=2", lambda: norm.GroupNorm(4, 2), (3, 4, 3, 3)),
    ("GroupNorm G=C", lambda: norm.GroupNorm(4, 4), (3, 4, 3, 3)),
    ("GroupNorm G=1", lambda: norm.GroupNorm(4, 1), (3, 4, 3, 3)),
    ("ScaleShift", lambda: norm.ScaleShift(3), (4, 3, 2, 2)),
    ("NormPropReLU", lambda: norm.NormPropReLU(), (4, 3, 3, 3)),
    ("TReLU", lambda: norm.TReLU(3), (4, 3, 3, 3)),
    ("WNConv2d", lambda: norm.WNConv2d(3, 4, 3, 1, 1, eps=1e-3), (2, 3, 5, 5)),
    ("WNConv2d stride 2, no bias", lambda: norm.WNConv2d(3, 4, 3, 2, 0, bias=False),
     (2, 3, 7, 7)),
    ("WNConv2d no gain (TReLU WN)", lambda: norm.WNConv2d(2, 3, 1, gain=False, bias=False),
     (2, 2, 4, 4)),
    ("WNLinear", lambda: norm.WNLinear(6, 4, eps=1e-3), (5, 6)),
    ("WNLinear no bias", lambda: norm.WNLinear(6, 4, bias=False), (5, 6)),
    ("NormProp unit stack", lambda: nn.Sequential(
        *_unit("normprop", 3, 4, 3, 1, 1, rng=np.random.default_rng(1)),
        *_unit("normprop", 4, 2, 3, 1, 1, rng=np.random.default_rng(2))), (2, 3, 5, 5)),
    ("TReLU WN unit stack + ScaleShift", lambda: nn.Sequential(
        *_unit("trelu", 3, 4, 3, 1, 1, rng=np.random.default_rng(3)),
        *_unit("trelu", 4, 2, 1, rng=np.random.default_rng(4)),
        norm.ScaleShift(2)), (2, 3, 5, 5)),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_gradients_train_mode(case, rng):
    label, build, shape = case
    layer = _f64(build())
    # make the parameters non-trivial (gamma = 1, beta = alpha = 0 hide mistakes)
    for _, sub, key in layer.named_parameters():
        p = sub.params[key]
        if key in ("gamma", "g"):
            sub.params[key] = np.abs(rng.standard_normal(p.shape)) + 0.5
        elif key in ("beta", "b", "alpha"):
            sub.params[key] = 0.3 * rng.standard_normal(p.shape)
    _check(layer, _x(rng, shape))


@pytest.mark.parametrize("build", [lambda: norm.BatchNorm(3), lambda: norm.MeanOnlyBatchNorm(3),
                                   lambda: norm.BatchRenorm(3)])
def test_layer_gradients_eval_mode(build, rng):
    layer = _f64(build())
    for k, buf in layer.buffers.items():
        layer.buffers[k] = np.abs(rng.standard_normal(buf.shape)) + 0.5
    layer.eval()
    _check(layer, _x(rng, (4, 3, 3, 3)))


def test_batch_renorm_layer_gradients_with_clipped_r_d(rng):
    # r and d carry no gradient; with both at their clips they are locally
    # constant and finite differences see the same function
    layer = _f64(norm.BatchRenorm(3, r_max=2.0, d_max=1.0, momentum=0.0))
    layer.buffers["running_mean"][...] = -50.0
    layer.buffers["running_var"][...] = 100.0
    _check(layer, _x(rng, (6, 3, 3, 3)))


def test_batch_renorm_layer_without_clipping_uses_running_statistics(rng):
    layer = _f64(norm.BatchRenorm(3, r_max=100.0, d_max=100.0))
    rm, rv = np.array([0.2, 0.4, 0.3]), np.array([2.0, 2.5, 1.8])
    layer.buffers["running_mean"][...] = rm
    layer.buffers["running_var"][...] = rv
    x = _x(rng, (16, 3, 2, 2))
    y = layer.forward(x)
    expected = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + layer.eps)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    # and the running statistics moved after the forward
    assert not np.allclose(layer.buffers["running_mean"], rm)


# -- BatchNorm statistics -------------------------------------------------------------

def test_batch_norm_training_output_is_standardized(rng):
    layer = norm.BatchNorm(4, dtype=np.float64)
    x = _x(rng, (16, 4, 5, 5), scale=3.0, shift=-2.0)
    y = layer.forward(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    var_b = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), var_b / (var_b + layer.eps), rtol=1e-12)
    assert abs(y.var() - 1) < 1e-5


@pytest.mark.parametrize("chunk", [None, 4])
def test_running_statistics_update(chunk, rng):
    layer = norm.BatchNorm(3, momentum=0.1, chunk=chunk, dtype=np.float64)
    rm0 = np.array([0.5, -0.5, 1.0])
    rv0 = np.array([2.0, 1.0, 0.5])
    layer.buffers["running_mean"][...] = rm0
    layer.buffers["running_var"][...] = rv0
    x = _x(rng, (8, 3, 3, 3), scale=2.0, shift=1.0)
    layer.forward(x)
    k = chunk or 8
    parts = x.reshape(8 // k, k, 3, 9)
    batch_mean = parts.mean(axis=(1, 3)).mean(axis=0)
    # unbiased running variance: ddof = 1 over the m = k * H * W values of each chunk
    batch_var = np.mean([parts[g].transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1)
                         for g in range(8 // k)], axis=0)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.9 * rm0 + 0.1 * batch_mean,
                               rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 * rv0 + 0.1 * batch_var,
                               rtol=1e-12)


def test_running_statistics_converge_to_the_data_statistics(rng):
    layer = norm.BatchNorm(2, momentum=0.5)
    data = _x(rng, (64, 2, 4, 4), scale=3.0, shift=5.0).astype(np.float32)
    for _ in range(40):
        layer.forward(data)
    np.testing.assert_allclose(layer.buffers["running_mean"], data.mean(axis=(0, 2, 3)),
                               rtol=1e-5)
    unbiased = data.transpose(1, 0, 2, 3).reshape(2, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(layer.buffers["running_var"], unbiased, rtol=1e-4)
    assert layer.buffers["running_var"].dtype == np.float32


def test_eval_mode_uses_running_statistics_hand_computation(rng):
    layer = norm.BatchNorm(2, eps=1e-3)
    layer.params["gamma"][...] = [2.0, -1.0]
    layer.params["beta"][...] = [0.5, 0.25]
    layer.buffers["running_mean"][...] = [1.0, -3.0]
    layer.buffers["running_var"][...] = [4.0, 0.09]
    layer.eval()
    x = np.array([[[[1.0]], [[-3.0]]], [[[3.0]], [[-2.7]]]], np.float32)   # (2, 2, 1, 1)
    y = layer.forward(x)
    # channel 0: 2 * (x - 1) / sqrt(4.001) + 0.5; channel 1: -(x + 3) / sqrt(0.091) + 0.25
    hand = np.array([[0.5, 0.25],
                     [2 * 2 / math.sqrt(4.001) + 0.5, -0.3 / math.sqrt(0.091) + 0.25]])
    np.testing.assert_allclose(y.reshape(2, 2), hand, rtol=1e-6)
    before = layer.buffers["running_mean"].copy()
    layer.forward(x * 10)
    np.testing.assert_array_equal(layer.buffers["running_mean"], before)  # eval: no update
    # eval output does not depend on the rest of the batch
    np.testing.assert_allclose(layer.forward(x[:1]), y[:1], rtol=1e-7)


def test_mean_only_batch_norm_eval_subtracts_running_mean(rng):
    layer = norm.MeanOnlyBatchNorm(3, dtype=np.float64)
    x = _x(rng, (6, 3, 2, 2))
    layer.forward(x)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * x.mean(axis=(0, 2, 3)))
    layer.params["beta"][...] = [1.0, 2.0, 3.0]
    layer.eval()
    y = layer.forward(x)
    np.testing.assert_allclose(y, x - layer.buffers["running_mean"][None, :, None, None]
                               + np.array([1.0, 2.0, 3.0])[None, :, None, None])


def test_batch_norm_float32_dtypes(rng):
    layer = norm.BatchNorm(8)
    x = _x(rng, (32, 8, 16, 16)).astype(np.float32)   # large enough for the fused kernels
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.grads["gamma"].dtype == np.float32
    assert layer.buffers["running_var"].dtype == np.float32


def test_batch_norm_chunk_must_divide_batch(rng):
    with pytest.raises(ValueError, match="not divisible by chunk=4"):
        norm.BatchNorm(3, chunk=4).forward(_x(rng, (6, 3, 2, 2)))


# -- weight normalization ------------------------------------------------------------

def test_wn_layers_g_init_norm_starts_at_the_init_weights():
    from tinynorm.nn.init import initialize
    layer = norm.WNConv2d(3, 5, 3, g_init="norm", rng=np.random.default_rng(7))
    v = initialize("caffe_xavier", (5, 3, 3, 3), np.random.default_rng(7), np.float32)
    np.testing.assert_array_equal(layer.params["v"], v)
    from tinynorm import ops
    w, _ = ops.weight_norm_forward(layer.params["v"], layer.params["g"], layer.eps)
    np.testing.assert_allclose(w, v, rtol=1e-6)
    np.testing.assert_array_equal(layer.params["b"], 0)
    assert "v" in layer.decay_keys and not {"g", "b"} & set(layer.decay_keys)


@pytest.mark.parametrize("cls,args", [(norm.WNConv2d, (3, 5, 3)), (norm.WNLinear, (7, 5))])
def test_wn_layers_default_to_unit_norm_filters(cls, args):
    # the paper's gamma starts at 1 like BN's: every effective filter has norm 1
    layer = cls(*args, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(layer.params["g"], 1.0)
    from tinynorm import ops
    w, _ = ops.weight_norm_forward(layer.params["v"], layer.params["g"], layer.eps)
    norms = np.sqrt((w.astype(np.float64) ** 2).reshape(len(w), -1).sum(axis=1))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_wn_norm_scale_divides_the_filters():
    layer = norm.WNConv2d(3, 4, 3, norm_scale=1.21, rng=np.random.default_rng(3),
                          dtype=np.float64)
    plain = norm.WNConv2d(3, 4, 3, rng=np.random.default_rng(3), dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6))
    np.testing.assert_allclose(layer.forward(x), plain.forward(x) / 1.21, rtol=1e-12)
    with pytest.raises(ValueError, match="norm_scale must be > 0"):
        norm.WNConv2d(3, 4, 3, norm_scale=0.0)
    with pytest.raises(ValueError, match="unknown g_init"):
        norm.WNConv2d(3, 4, 3, g_init="ones")


def test_normprop_and_trelu_conv_parameters():
    np_conv = nn.Sequential(*_unit("normprop", 3, 4, 3))
    assert set(np_conv.parameters()) == {"0.v", "0.g", "0.b"}
    np.testing.assert_array_equal(np_conv.children["0"].params["g"], 1.0)
    assert isinstance(np_conv.children["1"], norm.NormPropReLU)
    tr = nn.Sequential(*_unit("trelu", 3, 4, 3))
    assert set(tr.parameters()) == {"0.v", "1.alpha"}
    np.testing.assert_array_equal(tr.parameters()["1.alpha"], 0.0)


def test_normprop_eval_is_training(rng):
    layer = nn.Sequential(*_unit("normprop", 3, 4, 3, 1, 1, dtype=np.float64))
    x = _x(rng, (2, 3, 5, 5))
    y_train = layer.forward(x)
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), y_train)


def _wn_outputs(model, x):
    """Pre-activations of every WN layer on x (train mode), in order."""
    outs = []
    for _, layer in model.named_layers():
        if isinstance(layer, (norm.WNConv2d, norm.WNLinear)):
            layer.track_output_norm = False
    originals = {}

    def wrap(layer):
        f = layer.forward

        def forward(x):
            y = f(x)
            outs.append(y)
            return y
        originals[layer] = f
        layer.forward = forward

    for _, layer in model.named_layers():
        if isinstance(layer, (norm.WNConv2d, norm.WNLinear)):
            wrap(layer)
    model.forward(x)
    for layer, f in originals.items():
        layer.forward = f
    return outs


def test_data_dependent_init_standardizes_pre_activations(rng):
    model = nn.Sequential(
        norm.WNConv2d(3, 6, 3, 1, 1, rng=np.random.default_rng(0), dtype=np.float64),
        norm.TReLU(6, dtype=np.float64),
        norm.WNConv2d(6, 5, 3, 2, 1, rng=np.random.default_rng(1), dtype=np.float64),
        norm.NormPropReLU(),
        nn.Flatten(),
        norm.WNLinear(5 * 4 * 4, 7, rng=np.random.default_rng(2), dtype=np.float64))
    x = _x(rng, (16, 3, 8, 8), scale=2.0, shift=1.0)
    y = norm.data_dependent_init(model, x)
    assert y.shape == (16, 7)
    outs = _wn_outputs(model, x)
    assert len(outs) == 3
    for t in outs:
        axes = (0,) + tuple(range(2, t.ndim))
        np.testing.assert_allclose(t.mean(axis=axes), 0, atol=1e-10)
        np.testing.assert_allclose(t.var(axis=axes), 1, rtol=1e-8)
    np.testing.assert_array_equal(outs[-1], y)
    assert all(not l._ddi_pending for _, l in model.named_layers() if isinstance(l, norm._WNLayer))


def test_data_dependent_init_without_gain_only_centres(rng):
    layer = norm.WNConv2d(3, 4, 3, gain=False, bias=True, dtype=np.float64)
    x = _x(rng, (8, 3, 6, 6), shift=2.0)
    y = norm.data_dependent_init(nn.Sequential(layer), x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-10)
    assert "g" not in layer.params


def test_data_dependent_init_errors(rng):
    with pytest.raises(ValueError, match="no WNConv2d / WNLinear"):
        norm.data_dependent_init(nn.Sequential(norm.TReLU(3)), _x(rng, (2, 3)))

    class Partial(nn.Sequential):
        def forward(self, x):
            return self.children["0"](x)   # never reaches child "1"

    model = Partial(norm.WNLinear(3, 3), norm.WNLinear(3, 3))
    with pytest.raises(RuntimeError, match=r"did not reach WN layer\(s\) \['1'\]"):
        norm.data_dependent_init(model, _x(rng, (4, 3)).astype(np.float32))
    assert not model.children["1"]._ddi_pending


def test_layer_bad_input(rng):
    with pytest.raises(ValueError, match="cannot be split"):
        norm.GroupNorm(6, 4)
    with pytest.raises(ValueError, match="gamma has shape"):
        norm.BatchNorm(4).forward(_x(rng, (2, 3, 2, 2)).astype(np.float32))

"""The norm registry, the init options, NormProp's scale and the residual scale."""
import math
import sys

import numpy as np
import pytest

from tinynorm import nn, norms, ops, selfcheck
from tinynorm.gradcheck import gradcheck, gradcheck_layer
from tinynorm.models import build_model, cifar10_nv, resnet
from tinynorm.models.blocks import Bottleneck
from tinynorm.nn.init import fans, initialize
from tinynorm.profile import categories, category_of


# -- the registry -----------------------------------------------------------------------

def test_builtin_norms_and_their_residual_scales():
    assert set(norms.norm_names()) >= {"none", "bn", "wn", "normprop", "trelu"}
    # the paper modifies the residual block for NormProp alone
    assert norms.get_norm("normprop").residual_scale == pytest.approx(1 / math.sqrt(2))
    for name in ("none", "bn", "wn", "trelu"):
        assert norms.get_norm(name).residual_scale == 1.0
    assert norms.residual_scale("trelu") == 1.0
    assert norms.residual_scale("trelu", norms.UnitOptions(residual_scale=0.5)) == 0.5
    assert norms.residual_scale("bn", norms.UnitOptions(residual_scale=2.0)) == 2.0


@pytest.mark.parametrize("norm,expected", [("normprop", 1 / math.sqrt(2)), ("trelu", 1.0),
                                           ("wn", 1.0), ("bn", 1.0)])
def test_resnet_blocks_use_the_registry_default(norm, expected):
    model = resnet(norm, (1, 1, 1, 1), 10, "cifar", 1 / 16, 1)
    scales = [layer.scale for _, layer in model.named_layers() if isinstance(layer, Bottleneck)]
    assert len(scales) == 4 and scales == pytest.approx([expected] * 4)
    over = resnet(norm, (1, 1, 1, 1), 10, "cifar", 1 / 16, 1,
                  opts=norms.UnitOptions(residual_scale=0.3))
    assert [layer.scale for _, layer in over.named_layers()
            if isinstance(layer, Bottleneck)] == [0.3] * 4


def test_unknown_norm_and_bad_options_are_named_errors():
    with pytest.raises(ValueError, match="unknown norm 'bm'"):
        cifar10_nv("bm")
    with pytest.raises(ValueError, match="unknown init 'xavier2'"):
        norms.UnitOptions(init="xavier2")
    with pytest.raises(ValueError, match="wn_g_init"):
        norms.UnitOptions(wn_g_init="ones")
    with pytest.raises(ValueError, match="normprop_scale"):
        norms.UnitOptions(normprop_scale=0)
    with pytest.raises(ValueError, match="residual_scale"):
        norms.UnitOptions(residual_scale="half")
    with pytest.raises(ValueError, match="deep_linear has no 'trelu' variant"):
        build_model("deep_linear", "trelu", in_channels=1, num_classes=10, in_features=8)


@pytest.mark.parametrize("kind", ["conv", "block"])
def test_bottleneck_with_a_non_unit_scale_against_finite_differences(kind):
    rng = np.random.default_rng(5)
    opts = norms.UnitOptions(residual_scale=0.37)
    block = Bottleneck("wn", 4, 2, 4 if kind == "conv" else 6, 1 if kind == "conv" else 2,
                       rng=rng, dtype=np.float64, opts=opts)
    assert block.scale == 0.37
    # biases off zero: keep pre-activations away from ReLU's kink
    for _, layer in block.named_layers():
        if "b" in layer.params:
            layer.params["b"][...] = rng.standard_normal(layer.params["b"].shape)
    x = rng.standard_normal((2, 4, 5, 5))
    # atol 1e-8 as in the model-level checks (test_models.py): the finite
    # differences' round-off through a block is ~1e-10 absolute, which matters
    # only for the smallest gradients
    results = gradcheck_layer(block, x, rtol=1e-6, atol=1e-8)
    assert results and all(r.passed for r in results), [str(r) for r in results if not r.passed]


def test_bottleneck_scale_multiplies_the_sum_before_the_activation():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 5))
    a = Bottleneck("none", 4, 2, 4, rng=np.random.default_rng(1), dtype=np.float64,
                   opts=norms.UnitOptions(residual_scale=0.5))
    s = a.children["branch"](x) + x
    np.testing.assert_allclose(a.forward(x), np.maximum(0.5 * s, 0), rtol=1e-13)


def test_profile_categories_come_from_the_registry():
    assert category_of(nn.BatchNorm(3)) == "batch norm"
    assert category_of(nn.WNConv2d(3, 4, 3)) == "convolution"
    assert category_of(nn.TReLU(3)) == "relu"
    assert category_of(nn.NormPropReLU()) == "relu"
    assert category_of(nn.Linear(3, 4)) == "other"
    assert categories()[-1] == "other"


class _Scale2(nn.Layer):
    def forward(self, x):
        return 2 * x

    def backward(self, dy):
        return 2 * dy


def _conv_then(name, layer, label="test", **extra):
    """A test norm whose conv unit is Conv2d -> ``layer()``, ReLU, a Linear head."""
    return norms.Norm(
        name, label, "tab:pink",
        conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
            nn.Conv2d(c_in, c_out, k, s, p, rng=rng, init=opts.init, dtype=dtype), layer()],
        activation=lambda channels, *, dtype, opts: nn.ReLU(),
        head=lambda d_in, d_out, *, rng, dtype, opts: nn.Linear(d_in, d_out, rng=rng,
                                                                dtype=dtype), **extra)


def test_a_registered_norm_is_a_model_and_profile_choice():
    entry = _conv_then("test_double", _Scale2, "doubled", profile_categories={"_Scale2": "doubling"})
    norms.register_norm(entry)
    try:
        with pytest.raises(ValueError, match="already registered"):
            norms.register_norm(entry)
        assert "test_double" in norms.norm_names()
        model = build_model("cifar10_nv", "test_double", in_channels=1, num_classes=10,
                            width=1 / 16)
        assert sum(isinstance(l, _Scale2) for _, l in model.named_layers()) == 9
        assert "doubling" in categories()
        assert norms.label_of("test_double") == "doubled"
        net = resnet("test_double", (1, 1, 1, 1), 10, "cifar", 1 / 16, 1)
        assert isinstance(net.children["fc"], nn.Linear)
    finally:
        del norms.NORM_REGISTRY["test_double"]
    assert "doubling" not in categories()


def test_cli_import_flag_registers_a_plugin_norm(tmp_path, monkeypatch, capsys):
    from tinynorm.cli import main
    (tmp_path / "my_norm_plugin.py").write_text(
        "from tinynorm import norms\n"
        "norms.register_norm(norms.Norm('plugin_none', 'plugin', 'k',\n"
        "    conv_unit=norms.get_norm('none').conv_unit,\n"
        "    activation=norms.get_norm('none').activation,\n"
        "    head=norms.get_norm('none').head), replace=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["--import", "my_norm_plugin", "profile", "--model", "cifar10_nv",
                     "--norm", "plugin_none", "--width", "0.0625", "--batch-size", "4",
                     "--input", "1x12x12", "--steps", "1"]) == 0
        assert "norm=plugin_none" in capsys.readouterr().out
        # and `gradcheck` checks the plugin's units beside the built-in ones
        assert main(["--import", "my_norm_plugin", "gradcheck"]) == 0
        out = capsys.readouterr().out
        assert "unit plugin_none: conv 3x3 + act" in out and "unit bn: head" in out
    finally:
        norms.NORM_REGISTRY.pop("plugin_none", None)
        sys.modules.pop("my_norm_plugin", None)


def test_selfcheck_finds_op_modules_by_itself(tmp_path, monkeypatch):
    from tinynorm import ops as ops_pkg
    assert {"conv", "batchnorm", "weightnorm", "normprop", "trelu"} <= set(selfcheck.op_modules())
    assert not any(m.startswith("_") for m in selfcheck.op_modules())
    (tmp_path / "zz_myop.py").write_text(
        "def gradcheck_cases():\n"
        "    return [('zz doubling', lambda x: (2 * x, None), lambda dy, c: (2 * dy,),"
        " (__import__('numpy').ones(3),), ('x',))]\n")
    monkeypatch.setattr(ops_pkg, "__path__", list(ops_pkg.__path__) + [str(tmp_path)])
    try:
        assert "zz_myop" in selfcheck.op_modules()
        assert "zz doubling" in {c[0] for c in selfcheck.all_cases()}
    finally:
        sys.modules.pop("tinynorm.ops.zz_myop", None)


class _WrongBackward(_Scale2):
    def backward(self, dy):
        return 3 * dy                        # the forward doubles


@pytest.mark.parametrize("layer,passes", [(_Scale2, True), (_WrongBackward, False)])
def test_gradcheck_checks_a_registered_norms_units_as_the_models_build_them(layer, passes):
    entry = _conv_then("test_units", layer)
    norms.register_norm(entry)
    try:
        cases = [c for c in selfcheck.layer_cases() if c[0].startswith("unit test_units:")]
        assert [c[0] for c in cases] == ["unit test_units: conv 3x3 + act",
                                         "unit test_units: conv 1x1 stride 2 + act",
                                         "unit test_units: head"]
        # the conv unit is the registry's layers, in order, as cifar10-nv builds them
        assert [type(l) for l in cases[0][1].layers] == [nn.Conv2d, layer, nn.ReLU]
        results = [r for r in selfcheck.run_all() if r.op.startswith("unit test_units: conv")]
        assert all(r.passed for r in results) == passes
        if not passes:                       # the input gradient goes through the wrong layer
            assert {r.name for r in results if not r.passed} >= {"x", "0.w", "0.b"}
    finally:
        norms.NORM_REGISTRY.pop("test_units", None)


def test_selfcheck_finds_the_layers_of_every_nn_module():
    labels = [c[0] for c in selfcheck.layer_cases()]
    assert len(labels) == len(set(labels))
    for expected in ("layer Conv2d", "layer BatchNorm chunk=2", "layer WNConv2d norm_scale=1.21",
                     "layer TReLU", "unit bn: conv 3x3 + act", "unit normprop: head",
                     "unit trelu: output layer", "unit wn: linear unit (last)"):
        assert expected in labels, expected


# -- init -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 16, 3, 3), (300, 40), (32, 3, 3, 3)])
def test_caffe_xavier_is_uniform_with_fan_in_bound_and_unit_norm_filters(shape):
    w = initialize("caffe_xavier", shape, np.random.default_rng(0), np.float64)
    fan_in, _ = fans(shape)
    a = math.sqrt(3.0 / fan_in)
    assert np.abs(w).max() <= a and np.abs(w).max() > 0.95 * a
    sq_norms = (w.reshape(shape[0], -1) ** 2).sum(axis=1)
    # E ||W_j||^2 = fan_in * a^2 / 3 = 1; the mean over units is within a few sigma
    sigma = math.sqrt(fan_in * (a ** 4 / 5 - a ** 4 / 9)) / math.sqrt(shape[0])
    assert abs(sq_norms.mean() - 1.0) < 5 * sigma


def test_glorot_and_he_are_the_other_inits():
    shape = (64, 16, 3, 3)
    fan_in, fan_out = fans(shape)
    g = initialize("glorot", shape, np.random.default_rng(0), np.float64)
    assert np.abs(g).max() <= math.sqrt(6.0 / (fan_in + fan_out))
    h = initialize("he", shape, np.random.default_rng(0), np.float64)
    assert abs(h.var() - 2.0 / fan_in) < 0.1 * 2.0 / fan_in
    with pytest.raises(ValueError, match="ambiguous"):
        initialize("xavier", shape, np.random.default_rng(0))


@pytest.mark.parametrize("shape", [(64, 64), (10, 64), (64, 784), (96, 16, 3, 3), (8, 16, 3, 3)])
def test_orthogonal_has_every_singular_value_one(shape):
    w = initialize("orthogonal", shape, np.random.default_rng(0), np.float64)
    assert w.shape == shape
    s = np.linalg.svd(w.reshape(shape[0], -1), compute_uv=False)
    np.testing.assert_allclose(s, 1.0, atol=1e-12)
    # a product of square orthogonal layers stays orthogonal: gain 1 at any depth
    rng = np.random.default_rng(1)
    prod = np.eye(64)
    for _ in range(48):
        prod = initialize("orthogonal", (64, 64), rng, np.float64) @ prod
    np.testing.assert_allclose(np.linalg.svd(prod, compute_uv=False), 1.0, atol=1e-10)
    assert not np.array_equal(w, initialize("orthogonal", shape, np.random.default_rng(2),
                                            np.float64))


def test_models_default_to_caffe_xavier():
    model = cifar10_nv("none", 1, 10, width=0.25)
    w = model.children["conv1"].children["0"].params["w"]
    np.testing.assert_array_equal(
        w, initialize("caffe_xavier", w.shape, np.random.default_rng(0), np.float32))
    glorot = cifar10_nv("none", 1, 10, width=0.25, opts=norms.UnitOptions(init="glorot"))
    assert not np.array_equal(glorot.children["conv1"].children["0"].params["w"], w)


def test_wn_g_init_option_reaches_every_wn_layer():
    for g_init, check in (("one", lambda g, v: np.allclose(g, 1.0)),
                          ("norm", lambda g, v: np.allclose(
                              g, np.sqrt((v.astype(np.float64) ** 2).reshape(len(v), -1)
                                         .sum(axis=1)), rtol=1e-6))):
        model = resnet("wn", (1, 1, 1, 1), 10, "cifar", 1 / 16, 1,
                       opts=norms.UnitOptions(wn_g_init=g_init))
        wn = [l for _, l in model.named_layers() if isinstance(l, (nn.WNConv2d, nn.WNLinear))]
        assert len(wn) > 10 and all(check(l.params["g"], l.params["v"]) for l in wn)


def test_frozen_wn_gain_is_no_parameter_and_the_filters_stay_unit_norm():
    from tinynorm.gradcheck import gradcheck_layer
    from tinynorm.models import deep_linear
    model = deep_linear(5, 16, 20, 10, "wn", opts=norms.UnitOptions(wn_g_init="frozen"),
                        dtype=np.float64)
    wn = [l for _, l in model.named_layers() if isinstance(l, nn.WNLinear)]
    assert len(wn) == 5 and all(set(l.params) == {"v"} for l in wn)   # nothing to learn but v
    x = np.random.default_rng(0).standard_normal((8, 20))
    w = wn[0].params["v"] / (np.linalg.norm(wn[0].params["v"], axis=1, keepdims=True)
                             + wn[0].eps)
    np.testing.assert_allclose(wn[0].forward(x), x @ w.T, rtol=1e-12)
    assert all(r.passed for r in gradcheck_layer(model, x))


# -- NormProp's scale ---------------------------------------------------------------------

def test_normprop_units_divide_by_the_scaled_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6))
    unit = nn.Sequential(*norms.conv_unit("normprop", 3, 4, 3, 1, 1,
                                          rng=np.random.default_rng(1), dtype=np.float64))
    conv = unit.children["0"]
    assert conv.norm_scale == ops.NORMPROP_SCALE == 1.21
    v = conv.params["v"]
    w = v / (1.21 * (np.sqrt((v ** 2).sum(axis=(1, 2, 3))) + conv.eps))[:, None, None, None]
    z, _ = ops.conv2d_forward(x, w, conv.params["b"], 1, 1)
    expected = ops.NORMPROP_C1 * (np.maximum(z, 0) - ops.NORMPROP_C0)
    np.testing.assert_allclose(unit.forward(x), expected, rtol=1e-12)
    model = cifar10_nv("normprop", 1, 10, width=1 / 16,
                       opts=norms.UnitOptions(normprop_scale=1.0))
    assert {l.norm_scale for _, l in model.named_layers() if isinstance(l, nn.WNConv2d)} == {1.0}


@pytest.mark.parametrize("scale", [0.8, 1.21])
def test_weight_norm_scale_against_finite_differences(scale):
    rng = np.random.default_rng(9)
    v, g = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4) + 2
    results = gradcheck(ops.weight_norm_forward, ops.weight_norm_backward, v, g, 1e-3, scale,
                        names=["v", "g", "eps", "scale"])
    assert {r.name for r in results} == {"v", "g"} and all(r.passed for r in results)
    w, _ = ops.weight_norm_forward(v, g, 1e-3, scale)
    w1, _ = ops.weight_norm_forward(v, g, 1e-3)
    np.testing.assert_allclose(w * scale, w1, rtol=1e-14)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ops.weight_norm_forward(v, g, 1e-3, 0.0)

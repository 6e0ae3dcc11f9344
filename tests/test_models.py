"""Models: parameter counts against hand counts, shapes, model-level gradient checks."""
import numpy as np
import pytest

from tinynorm.gradcheck import gradcheck_layer
from tinynorm.models import cifar10_nv, deep_linear, resnet, resnet50
from tinynorm.models.blocks import NORMS


def conv_params(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def test_cifar10_nv_parameter_count_matches_table_2_by_hand():
    # Table 2, no normalization: every conv has a bias
    table2 = [(3, 128, 3), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3),
              (256, 256, 3), (256, 320, 3), (320, 320, 1), (320, 10, 1)]
    n_none = sum(conv_params(ci, co, k) for ci, co, k in table2)
    assert cifar10_nv("none").num_parameters() == n_none == 2_617_610
    # BN after conv3 and conv6: those convs lose the bias, BN adds gamma and beta
    n_bn = n_none - 128 - 256 + 2 * 128 + 2 * 256
    assert cifar10_nv("bn").num_parameters() == n_bn
    # WN: v (same size as w), g and b per output channel
    n_wn = sum(conv_params(ci, co, k) + co for ci, co, k in table2)
    assert cifar10_nv("wn").num_parameters() == n_wn
    assert cifar10_nv("normprop").num_parameters() == n_wn
    # TReLU WN: v and alpha per conv, gamma/beta once on the last layer
    n_trelu = sum(conv_params(ci, co, k, bias=False) + co for ci, co, k in table2) + 2 * 10
    assert cifar10_nv("trelu").num_parameters() == n_trelu


@pytest.mark.parametrize("norm", NORMS)
def test_cifar10_nv_output_sizes_follow_table_2(norm):
    model = cifar10_nv(norm, width=0.125)
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    sizes = {}
    h = x
    for name, layer in model.children.items():
        h = layer(h)
        sizes[name] = h.shape[1:]
    assert sizes["conv3"][1:] == (28, 28) and sizes["pool3"][1:] == (14, 14)
    assert sizes["pool6"][1:] == (7, 7) and sizes["conv7"][1:] == (5, 5)
    assert sizes["conv9"] == (10, 5, 5) and h.shape == (2, 10)
    assert h.dtype == np.float32


def test_resnet50_bn_has_the_standard_parameter_count():
    assert resnet50("bn", num_classes=1000, stem="imagenet").num_parameters() == 25_557_032


def test_resnet50_bn_chunk_reaches_every_batch_norm():
    from tinynorm.nn import BatchNorm
    model = resnet50("bn", num_classes=10, stem="cifar", width=0.0625, bn_chunk=64)
    bns = [l for _, l in model.named_layers() if isinstance(l, BatchNorm)]
    assert len(bns) == 53 and all(b.chunk == 64 for b in bns)


def test_deep_linear_structure():
    model = deep_linear(50, 64, 784, 10, "wn")
    names = [n for n, _, _ in model.named_parameters()]
    assert len([n for n in names if n.endswith(".v")]) == 50
    assert not any(n.endswith(".b") for n in names)          # no bias anywhere
    assert model.num_parameters() == 784 * 64 + 48 * 64 * 64 + 64 * 10 + 49 * 64 + 10


def _tiny(name, norm):
    if name == "cifar10_nv":
        return cifar10_nv(norm, in_channels=2, num_classes=3, width=1 / 64, seed=1,
                          dtype=np.float64), (4, 2, 12, 12)
    if name == "resnet":
        return resnet(norm, depths=(1, 1), num_classes=3, stem="cifar", width=1 / 32,
                      in_channels=2, bn_chunk=2 if norm == "bn" else None, seed=1,
                      dtype=np.float64), (4, 2, 6, 6)
    return deep_linear(6, 5, 8, 3, norm, seed=1, dtype=np.float64), (6, 8)


@pytest.mark.parametrize("name,norm", [("cifar10_nv", n) for n in NORMS]
                         + [("resnet", n) for n in NORMS]
                         + [("deep_linear", n) for n in ("wn", "bn", "none")])
def test_model_level_gradients(name, norm):
    model, shape = _tiny(name, norm)
    rng = np.random.default_rng(2)
    # zero biases put pre-activations exactly on ReLU's kink wherever a 1x1 conv
    # sees only dead units; finite differences are undefined there
    for _, layer, key in model.named_parameters():
        if key in ("b", "beta", "alpha"):
            layer.params[key][...] = 0.1 * rng.standard_normal(layer.params[key].shape)
    x = rng.standard_normal(shape)
    # atol 1e-8: round-off of the finite differences through a whole model is
    # ~1e-10 absolute; it matters only for gradients that are (near) zero by
    # construction, e.g. BN's beta followed by another BN in deep_linear
    results = gradcheck_layer(model, x, rtol=1e-6, atol=1e-8, max_elementwise=64,
                              n_directions=3)
    assert results and all(r.passed for r in results)


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm"):
        cifar10_nv("foo")

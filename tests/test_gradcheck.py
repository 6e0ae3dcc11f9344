"""The public gradient checker itself, and `tinynorm gradcheck`."""
import numpy as np
import pytest

from tinynorm.cli import main as cli_main
from tinynorm.gradcheck import GradcheckError, gradcheck, gradcheck_layer
from tinynorm.nn import Linear, ReLU, Sequential


def square_forward(x, a):
    return a * x * x, (x, a)


def square_backward(dy, cache):
    x, a = cache
    return 2 * a * x * dy, (x * x * dy).sum()


def test_correct_gradients_pass_elementwise_and_directional():
    rng = np.random.default_rng(5)
    small = gradcheck(square_forward, square_backward, rng.standard_normal((3, 4)),
                      np.array(1.5), names=["x", "a"])
    assert [r.mode for r in small] == ["elementwise", "elementwise"]
    large = gradcheck(square_forward, square_backward, rng.standard_normal((30, 40)),
                      np.array(1.5), names=["x", "a"])
    assert large[0].mode == "directional" and all(r.passed for r in small + large)
    assert max(r.max_rel_error for r in small + large) < 1e-8


def test_a_wrong_gradient_is_named_with_both_values():
    def wrong_backward(dy, cache):
        dx, da = square_backward(dy, cache)
        dx = dx.copy()
        dx[1, 2] *= 1.001          # one element off by 0.1%
        return dx, da
    x = np.random.default_rng(6).standard_normal((3, 4)) + 2.0
    with pytest.raises(GradcheckError, match=r"gradient of 'x' FAILS .*element \(1, 2\).*"
                                             r"analytic .* numeric .* relative error"):
        gradcheck(square_forward, wrong_backward, x, np.array(1.5), names=["x", "a"])
    results = gradcheck(square_forward, wrong_backward, x, np.array(1.5), names=["x", "a"],
                        raise_on_fail=False)
    assert not results[0].passed and results[0].worst == (1, 2) and results[1].passed


def test_gradient_of_wrong_shape_is_reported():
    with pytest.raises(GradcheckError, match="has shape"):
        gradcheck(square_forward, lambda dy, c: (np.zeros(3), 0.0), np.ones((3, 4)),
                  np.array(1.0))


def test_a_list_where_an_array_belongs_is_one_line():
    def list_backward(dy, cache):
        dx, da = square_backward(dy, cache)
        return dx.tolist(), da
    with pytest.raises(GradcheckError, match=r"^gradient of 'x' is a list, not an array; return "
                                             r"a NumPy or CuPy array of the argument's shape "
                                             r"\(3, 4\)$"):
        gradcheck(square_forward, list_backward, np.ones((3, 4)), np.array(1.0),
                  names=["x", "a"])
    layer = Linear(4, 3, rng=np.random.default_rng(0), dtype=np.float64)
    backward = layer.backward

    def backward_leaving_a_list(dy):
        dx = backward(dy)
        layer.grads["w"] = layer.grads["w"].tolist()
        return dx
    layer.backward = backward_leaving_a_list
    with pytest.raises(GradcheckError, match=r"gradient of 'w' is a list, not an array"):
        gradcheck_layer(layer, np.ones((2, 4)))


def test_gradcheck_layer_walks_nested_parameters():
    rng = np.random.default_rng(7)
    model = Sequential(Linear(4, 5, rng=rng, dtype=np.float64), ReLU(),
                       Linear(5, 3, rng=rng, dtype=np.float64))
    results = gradcheck_layer(model, rng.standard_normal((6, 4)) + 0.1)
    assert [r.name for r in results] == ["x", "0.w", "0.b", "2.w", "2.b"]
    assert all(r.passed for r in results)


def test_cli_gradcheck_passes_every_builtin_op_and_layer(capsys):
    assert cli_main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    for op in ("conv2d", "max_pool2d", "avg_pool2d", "softmax_cross_entropy", "batch_norm",
               "weight_norm", "normprop_relu", "trelu", "layer BatchNorm chunk=2",
               "layer WNConv2d", "layer Conv2d", "unit trelu: conv 3x3 + act",
               "unit normprop: conv 1x1 stride 2 + act", "unit bn: linear unit"):
        assert op in out, op
    assert "FAIL" not in out


@pytest.mark.parametrize("size", [(3, 4), (30, 40)])      # element-wise and directional
def test_an_argument_in_another_memory_layout_is_perturbed_in_that_layout(size):
    # a transposed (F-ordered) argument stays so, and its perturbations reach the
    # forward (through a flat copy they would not: every numeric gradient 0)
    def forward(x):
        assert x.flags.f_contiguous and not x.flags.c_contiguous
        return x * x, x

    def backward(dy, x):
        return 2 * x * dy
    x = np.random.default_rng(3).standard_normal(size[::-1]).T
    results = gradcheck(forward, backward, x, names=["x"])
    assert [r.passed for r in results] == [True]

"""linear, relu, max/avg pooling, softmax cross-entropy and dropout: gradients,
values against naive references, dtypes, argument errors."""
import numpy as np
import pytest

from tinynorm import config
from tinynorm.gradcheck import gradcheck
from tinynorm.ops import activations, dropout, linear, loss, pooling
from tinynorm.ops.activations import relu_backward, relu_forward
from tinynorm.ops.dropout import dropout_backward, dropout_forward
from tinynorm.ops.linear import linear_backward, linear_forward
from tinynorm.ops.loss import softmax_cross_entropy
from tinynorm.ops.pooling import (avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward,
                                  max_pool2d_forward)


def _all_pass(results, names):
    assert [r.name for r in results] == list(names)
    return all(r.passed and r.max_rel_error <= 1e-6 for r in results)


# --- linear -------------------------------------------------------------------

@pytest.mark.parametrize("n,d_in,d_out,bias", [(5, 7, 4, True), (1, 6, 3, True),
                                               (4, 3, 5, False), (9, 30, 2, True)])
def test_linear_gradients(rng, n, d_in, d_out, bias):
    x = rng.standard_normal((n, d_in))
    w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal(d_out) if bias else None
    results = gradcheck(linear_forward, linear_backward, x, w, b, names=("x", "w", "b"))
    assert _all_pass(results, ["x", "w", "b"] if bias else ["x", "w"])


def test_linear_values_and_float32(rng):
    x = rng.standard_normal((6, 5))
    w = rng.standard_normal((3, 5))
    b = rng.standard_normal(3)
    y, cache = linear_forward(x, w, b)
    np.testing.assert_allclose(y, np.einsum("nd,od->no", x, w) + b, rtol=1e-13)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = linear_backward(dy, cache)
    np.testing.assert_allclose(dx, np.einsum("no,od->nd", dy, w), rtol=1e-13)
    np.testing.assert_allclose(dw, np.einsum("no,nd->od", dy, x), rtol=1e-13)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-13)
    y32, _ = linear_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    assert y32.dtype == np.float32 and y32.flags.c_contiguous
    np.testing.assert_allclose(y32, y, rtol=0, atol=1e-5 * np.abs(y).max())
    _, _, db_none = linear_backward(dy, linear_forward(x, w, None)[1])
    assert db_none is None


@pytest.mark.parametrize("args,match", [
    (lambda x, w, b: (x[None], w, b), r"x must be 2-D \(N, D_in\); got shape \(1, 4, 5\)"),
    (lambda x, w, b: (x, w[None], b), r"w must be 2-D \(D_out, D_in\)"),
    (lambda x, w, b: (x[:, :4], w, b), r"feature mismatch: x has D_in=4 .* D_in=5"),
    (lambda x, w, b: (x, w, b[:2]), r"bias shape mismatch: b has shape \(2,\), expected \(3,\)"),
    (lambda x, w, b: (x, w.astype(np.float32), b), r"dtype mismatch"),
])
def test_linear_bad_input(args, match):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    with pytest.raises(ValueError, match="linear: " + match):
        linear_forward(*args(x, w, b))


def test_linear_backward_rejects_wrong_dy(rng):
    _, cache = linear_forward(rng.standard_normal((4, 5)), rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match=r"linear_backward: dy has shape \(4, 2\), expected "
                                         r"\(4, 3\)"):
        linear_backward(np.zeros((4, 2)), cache)


# --- relu -----------------------------------------------------------------------

def _away_from_zero(rng, shape, margin=0.1):
    return rng.uniform(margin, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7, 6), (1, 1, 3, 1), (300,)])
def test_relu_gradients(rng, shape):
    x = _away_from_zero(rng, shape)
    assert _all_pass(gradcheck(relu_forward, relu_backward, x, names=("x",)), ["x"])


@pytest.mark.parametrize("parallel", [True, False])
def test_relu_values_kink_and_nan(parallel):
    with config.using(parallel_kernels=parallel, parallel_min_work=0):
        _check_relu_values_kink_and_nan()


def _check_relu_values_kink_and_nan():
    x = np.array([[-2.0, -0.0, 0.0, 3.0, np.nan, -np.inf, np.inf]] * 3, dtype=np.float32)
    y, cache = relu_forward(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))          # NaN propagates
    (dx,) = relu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx[0], [0, 0, 0, 1, 0, 0, 1])   # gradient 0 at the kink
    big = np.random.default_rng(1).standard_normal((64, 1000))
    np.testing.assert_array_equal(relu_forward(big)[0], np.maximum(big, 0))


def test_relu_non_contiguous_and_errors(rng):
    x = rng.standard_normal((4, 6)).T
    y, cache = relu_forward(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert y.flags.c_contiguous
    with pytest.raises(ValueError, match=r"relu_backward: dy has shape \(6, 3\), expected "
                                         r"\(6, 4\)"):
        relu_backward(np.ones((6, 3)), cache)
    with pytest.raises(ValueError, match="relu: x must be a floating-point array"):
        relu_forward(np.arange(4))


# --- pooling ----------------------------------------------------------------------

def _naive_pool(x, kernel, stride, pad, mode):
    """One window at a time; padding excluded from max and from the average."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.empty((n, c, oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            r0, c0 = oy * sh - ph, ox * sw - pw
            win = x[:, :, max(r0, 0):min(r0 + kh, h), max(c0, 0):min(c0 + kw, w)]
            y[:, :, oy, ox] = win.max(axis=(2, 3)) if mode == "max" else win.mean(axis=(2, 3))
    return y


def _distinct(rng, shape):
    """Values 0.1 apart in random order: no ties, finite differences stay in one piece."""
    return rng.permutation(np.arange(int(np.prod(shape)), dtype=np.float64)).reshape(shape) * 0.1


POOL_CONFIGS = [((2, 2, 7, 6), 3, 2, 1), ((1, 3, 5, 5), 2, 1, 0), ((2, 1, 9, 8), 5, 2, 2),
                ((1, 2, 6, 7), (3, 2), (1, 2), (1, 0)), ((2, 2, 5, 5), 5, 1, 0),
                ((1, 1, 4, 5), 4, None, 3), ((3, 2, 8, 8), 3, 3, 1), ((1, 1, 1, 1), 1, 1, 0)]


@pytest.mark.parametrize("shape,kernel,stride,pad", POOL_CONFIGS)
def test_max_pool_gradients(rng, shape, kernel, stride, pad):
    x = _distinct(rng, shape)
    results = gradcheck(max_pool2d_forward, max_pool2d_backward, x, kernel, stride, pad,
                        names=("x", "kernel", "stride", "pad"))
    assert _all_pass(results, ["x"])


@pytest.mark.parametrize("shape,kernel,stride,pad", POOL_CONFIGS)
def test_avg_pool_gradients(rng, shape, kernel, stride, pad):
    x = rng.standard_normal(shape)
    results = gradcheck(avg_pool2d_forward, avg_pool2d_backward, x, kernel, stride, pad,
                        names=("x", "kernel", "stride", "pad"))
    assert _all_pass(results, ["x"])


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("shape,kernel,stride,pad", POOL_CONFIGS)
def test_pool_fast_generic_and_naive_agree(shape, kernel, stride, pad, parallel):
    with config.using(parallel_kernels=parallel, parallel_min_work=0):
        _check_pool_fast_generic_and_naive_agree(shape, kernel, stride, pad)


def _check_pool_fast_generic_and_naive_agree(shape, kernel, stride, pad):
    rng = np.random.default_rng(11)
    x = _distinct(rng, shape)
    k, s, p, (oh, ow) = pooling._check_args("t", x, kernel, stride, pad)
    dy = rng.standard_normal((shape[0], shape[1], oh, ow))
    with config.using(use_numba=False):       # the array-generic versions
        y_gen, cache_gen = max_pool2d_forward(x, kernel, stride, pad)
        ya_gen, cachea_gen = avg_pool2d_forward(x, kernel, stride, pad)
    assert cache_gen[0] == "generic" and cachea_gen[0] == "generic"
    # max
    y, cache = max_pool2d_forward(x, kernel, stride, pad)
    assert cache[0] == "numba"
    np.testing.assert_array_equal(y, _naive_pool(x, k, s, p, "max"))
    np.testing.assert_array_equal(y_gen, y)
    np.testing.assert_allclose(max_pool2d_backward(dy, cache)[0],
                               max_pool2d_backward(dy, cache_gen)[0], rtol=1e-14, atol=1e-14)
    # avg
    y, cache = avg_pool2d_forward(x, kernel, stride, pad)
    np.testing.assert_allclose(y, _naive_pool(x, k, s, p, "avg"), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ya_gen, y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(avg_pool2d_backward(dy, cache)[0],
                               avg_pool2d_backward(dy, cachea_gen)[0], rtol=1e-13, atol=1e-13)


def test_max_pool_padding_is_minus_infinity_and_ties_go_to_the_first():
    x = -np.ones((1, 1, 3, 3))            # all negative: zero padding would win
    y, cache = max_pool2d_forward(x, 3, 1, 1)
    np.testing.assert_array_equal(y, -np.ones((1, 1, 3, 3)))
    (dx,) = max_pool2d_backward(np.ones_like(y), cache)
    # every window's first (row-major) real pixel takes its gradient: pixel (0,0)
    # is first in the windows of outputs (0,0), (0,1), (1,0), (1,1)
    assert dx[0, 0, 0, 0] == 4 and dx.sum() == 9


def test_max_pool_nan_propagates():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    y, _ = max_pool2d_forward(x, 2, 2, 0)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1, 1])


def test_avg_pool_excludes_padding_and_global_pool_is_the_mean(rng):
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    y, _ = avg_pool2d_forward(x, 3, 1, 1)
    # corner window covers x[0:2, 0:2] = 1, 2, 4, 5 only (count_include_pad=False)
    assert y[0, 0, 0, 0] == pytest.approx(3.0)
    assert y[0, 0, 1, 1] == pytest.approx(5.0)
    x = rng.standard_normal((3, 4, 5, 7)).astype(np.float32)
    y, cache = avg_pool2d_forward(x, x.shape[2:], 1, 0)
    assert y.shape == (3, 4, 1, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-7)
    (dx,) = avg_pool2d_backward(np.ones_like(y), cache)
    np.testing.assert_allclose(dx, np.full(x.shape, 1 / 35, np.float32), rtol=1e-6)


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
def test_pool_float32_agrees_with_float64(rng, forward):
    x = rng.standard_normal((2, 3, 11, 9))
    y64, cache64 = forward(x, 3, 2, 1)
    y32, cache32 = forward(x.astype(np.float32), 3, 2, 1)
    assert y32.dtype == np.float32 and y32.flags.c_contiguous
    np.testing.assert_allclose(y32, y64, rtol=1e-6, atol=1e-6)
    backward = max_pool2d_backward if forward is max_pool2d_forward else avg_pool2d_backward
    dy = rng.standard_normal(y64.shape)
    np.testing.assert_allclose(backward(dy.astype(np.float32), cache32)[0],
                               backward(dy, cache64)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("forward", [max_pool2d_forward, avg_pool2d_forward])
@pytest.mark.parametrize("args,match", [
    ((np.zeros((3, 4, 4)), 2, 2, 0), r"x must be 4-D \(N, C, H, W\)"),
    ((np.zeros((1, 1, 4, 4)), 2, 2, 2), r"pad \(2, 2\) must be smaller than kernel \(2, 2\)"),
    ((np.zeros((1, 1, 2, 5)), 5, 1, 1), r"kernel 5x5 is larger than the padded input 4x7"),
    ((np.zeros((1, 1, 4, 4)), 0, 1, 0), r"kernel must be >= 1"),
    ((np.zeros((1, 1, 4, 4)), 2, (1, 0), 0), r"stride must be >= 1"),
    ((np.zeros((1, 1, 4, 4), dtype=np.int32), 2, 2, 0), r"x must be a floating-point array"),
])
def test_pool_bad_input(forward, args, match):
    name = forward.__name__.replace("_forward", "")
    with pytest.raises(ValueError, match=f"{name}: {match}"):
        forward(*args)


def test_pool_backward_rejects_wrong_dy(rng):
    x = rng.standard_normal((2, 3, 6, 6))
    for forward, backward, name in [(max_pool2d_forward, max_pool2d_backward, "max_pool2d"),
                                    (avg_pool2d_forward, avg_pool2d_backward, "avg_pool2d")]:
        y, cache = forward(x, 2, 2, 0)
        with pytest.raises(ValueError, match=rf"{name}_backward: dy has shape \(2, 3, 3, 2\)"):
            backward(y[..., :2], cache)


# --- softmax cross-entropy -------------------------------------------------------

@pytest.mark.parametrize("n,k", [(5, 4), (1, 10), (6, 3), (3, 2)])
def test_softmax_cross_entropy_gradient(rng, n, k):
    logits = rng.standard_normal((n, k))
    labels = rng.integers(0, k, size=n)
    results = gradcheck(softmax_cross_entropy, loss._sce_backward, logits, labels,
                        names=("logits", "labels"))
    assert _all_pass(results, ["logits"])


def test_softmax_cross_entropy_values(rng):
    logits = rng.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2])
    value, dlogits = softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert float(value) == pytest.approx(-np.mean(np.log(p[np.arange(4), labels])), rel=1e-13)
    onehot = np.eye(5)[labels]
    np.testing.assert_allclose(dlogits, (p - onehot) / 4, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dlogits.sum(1), 0, atol=1e-15)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1e4], [-1e4, 1e4]], dtype=np.float32)
    value, dlogits = softmax_cross_entropy(logits, np.array([1, 1, 0]))
    # exact: (1000 + 0 + 2e4) / 3
    assert np.isfinite(value) and float(value) == pytest.approx(21000 / 3, rel=1e-6)
    assert np.all(np.isfinite(dlogits)) and dlogits.dtype == np.float32
    np.testing.assert_allclose(dlogits, [[1 / 3, -1 / 3], [0, 0], [-1 / 3, 1 / 3]], atol=1e-7)


@pytest.mark.parametrize("labels,match", [
    (np.array([0, 1, 5]), r"label out of range: labels\[2\] = 5, expected 0 <= label < 4"),
    (np.array([0, -1, 2]), r"label out of range: labels\[1\] = -1"),
    (np.array([0, 1]), r"labels must have shape \(3,\)"),
    (np.array([[0, 1, 2]]), r"labels must have shape \(3,\)"),
    (np.array([0.0, 1.0, 2.0]), r"labels must be integers"),
])
def test_softmax_cross_entropy_bad_labels(labels, match):
    with pytest.raises(ValueError, match="softmax_cross_entropy: " + match):
        softmax_cross_entropy(np.zeros((3, 4)), labels)


def test_softmax_cross_entropy_bad_logits():
    with pytest.raises(ValueError, match=r"logits must be 2-D \(N, classes\)"):
        softmax_cross_entropy(np.zeros((3, 4, 1)), np.zeros(3, int))


# --- dropout ------------------------------------------------------------------------

def test_dropout_is_identity_in_eval_and_for_p_zero(rng):
    x = rng.standard_normal((4, 5))
    for p, train in [(0.5, False), (0.0, True)]:
        y, cache = dropout_forward(x, p, rng, train)
        assert y is x and cache is None
        dy = rng.standard_normal(x.shape)
        assert dropout_backward(dy, cache)[0] is dy


def test_dropout_train_statistics_and_mask_reuse():
    x = np.ones((200, 500), dtype=np.float32)
    y, mask = dropout_forward(x, 0.3, np.random.default_rng(0), True)
    assert y.dtype == np.float32
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)      # inverted scaling
    assert abs(float(y.mean()) - 1.0) < 0.02
    (dx,) = dropout_backward(np.full(x.shape, 2.0, np.float32), mask)
    np.testing.assert_array_equal(dx != 0, kept)
    # same seed, same mask; different seed, different mask
    y2, _ = dropout_forward(x, 0.3, np.random.default_rng(0), True)
    y3, _ = dropout_forward(x, 0.3, np.random.default_rng(1), True)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(y, y3)


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_dropout_gradient(rng, p):
    x = rng.standard_normal((3, 4, 5))
    results = gradcheck(lambda a: dropout_forward(a, p, np.random.default_rng(3), True),
                        dropout_backward, x, names=("x",))
    assert _all_pass(results, ["x"])


@pytest.mark.parametrize("p,rng_arg,match", [(1.0, 0, r"p must be in \[0, 1\); got 1.0"),
                                             (-0.1, 0, r"p must be in \[0, 1\)"),
                                             ("a", 0, r"p must be a number"),
                                             (0.5, None, r"rng is required")])
def test_dropout_bad_input(p, rng_arg, match):
    gen = None if rng_arg is None else np.random.default_rng(rng_arg)
    with pytest.raises(ValueError, match="dropout: " + match):
        dropout_forward(np.ones((2, 2)), p, gen, True)


# --- every module's `tinynorm gradcheck` cases ------------------------------------

@pytest.mark.parametrize("module", [linear, activations, pooling, loss, dropout])
def test_module_gradcheck_cases_pass(module):
    cases = module.gradcheck_cases()
    assert cases
    for label, fwd, bwd, args, names in cases:
        results = gradcheck(fwd, bwd, *args, names=names, op=label)
        assert results and all(r.passed for r in results)


# --- GPU (skipped without one) ------------------------------------------------------

@pytest.mark.gpu
def test_gpu_core_ops_match_cpu():
    from tinynorm import backend
    cp = backend.cupy
    rng = np.random.default_rng(21)
    x4 = _distinct(rng, (2, 3, 7, 6))
    for forward, backward in [(max_pool2d_forward, max_pool2d_backward),
                              (avg_pool2d_forward, avg_pool2d_backward)]:
        y, cache = forward(x4, 3, 2, 1)
        y_gpu, cache_gpu = forward(cp.asarray(x4), 3, 2, 1)
        np.testing.assert_allclose(cp.asnumpy(y_gpu), y, rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        np.testing.assert_allclose(cp.asnumpy(backward(cp.asarray(dy), cache_gpu)[0]),
                                   backward(dy, cache)[0], rtol=1e-12, atol=1e-12)
    x = _away_from_zero(rng, (4, 5))
    y_gpu, cache_gpu = relu_forward(cp.asarray(x))
    np.testing.assert_array_equal(cp.asnumpy(y_gpu), np.maximum(x, 0))
    np.testing.assert_array_equal(cp.asnumpy(relu_backward(cp.ones((4, 5)), cache_gpu)[0]),
                                  (x > 0).astype(float))
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    y_gpu, _ = linear_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    np.testing.assert_allclose(cp.asnumpy(y_gpu), x @ w.T + b, rtol=1e-12)
    labels = np.array([0, 2, 1, 1])
    logits = rng.standard_normal((4, 3))
    value, dlogits = softmax_cross_entropy(logits, labels)
    value_gpu, dlogits_gpu = softmax_cross_entropy(cp.asarray(logits), cp.asarray(labels))
    assert float(value_gpu) == pytest.approx(float(value), rel=1e-12)
    np.testing.assert_allclose(cp.asnumpy(dlogits_gpu), dlogits, rtol=1e-12, atol=1e-15)
    y_gpu, mask = dropout_forward(cp.asarray(x), 0.5, backend.default_rng(0, "gpu"), True)
    assert isinstance(y_gpu, cp.ndarray) and set(np.unique(cp.asnumpy(mask))) <= {0.0, 2.0}

"""Normalization ops: gradients (float64, rtol 1e-6), invariants, bad input."""
import math

import numpy as np
import pytest

from tinynorm import config, ops, selfcheck
from tinynorm.gradcheck import gradcheck
from tinynorm.ops import batchnorm, layernorm, normprop, trelu, weightnorm

RTOL = 1e-6  # never loosen
NORM_MODULES = [batchnorm, weightnorm, normprop, trelu, layernorm]
CASES = [case for mod in NORM_MODULES for case in mod.gradcheck_cases()]


# -- gradients -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_cases(case):
    label, forward, backward, args, names = case
    results = gradcheck(forward, backward, *args, names=names, rtol=RTOL, op=label)
    assert results and all(r.passed for r in results)


def test_selfcheck_collects_every_norm_case():
    labels = {c[0] for c in selfcheck.all_cases()}
    assert {c[0] for c in CASES} <= labels


@pytest.mark.parametrize("shape,chunk", [((6, 3, 4, 5), None), ((6, 3, 4, 5), 3),
                                         ((8, 2, 1, 1), 4), ((4, 5, 4, 4), 1),
                                         ((9, 4), None), ((9, 4), 3)])
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_batch_norm_gradients_shapes_chunks(shape, chunk, path, rng):
    x = rng.standard_normal(shape) * 3 + 1
    c = shape[1]
    if path == "fused" and x.ndim != 4:
        pytest.skip("the numba kernels are for 4-D input")
    fwd, bwd = ((batchnorm.batch_norm_forward_fused, batchnorm.batch_norm_backward_fused)
                if path == "fused" else (batchnorm.batch_norm_forward_reference,
                                         batchnorm.batch_norm_backward_reference))
    results = gradcheck(lambda x, g, b: fwd(x, g, b, 1e-3, chunk), bwd, x,
                        rng.standard_normal(c) + 1, rng.standard_normal(c),
                        names=("x", "gamma", "beta"), rtol=RTOL)
    assert len(results) == 3 and all(r.passed for r in results)


def test_batch_norm_without_affine_returns_none(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    y, cache = ops.batch_norm_forward(x, None, None, 1e-5)
    dx, dgamma, dbeta = ops.batch_norm_backward(rng.standard_normal(x.shape), cache)
    assert dgamma is None and dbeta is None
    results = gradcheck(lambda x: ops.batch_norm_forward(x, None, None, 1e-5),
                        lambda dy, c: ops.batch_norm_backward(dy, c)[:1], x, rtol=RTOL)
    assert results[0].passed


def test_batch_renorm_backward_treats_r_d_as_constants(rng):
    """Unclipped r, d: the analytic gradient equals finite differences of the
    forward with r and d frozen at their values (Ioffe's stop_gradient)."""
    x = rng.standard_normal((8, 3, 3, 3)) * 1.3 + 0.2
    gamma, beta = rng.standard_normal(3) + 1, rng.standard_normal(3)
    rmean, rvar = np.array([0.1, 0.3, 0.0]), np.array([1.5, 1.2, 2.0])
    _, cache = ops.batch_renorm_forward(x, gamma, beta, rmean, rvar, 1e-5, 3.0, 5.0)
    r, d = cache.extra
    assert np.all((r > 1 / 3) & (r < 3)) and np.all(np.abs(d) < 5)  # not clipped

    def frozen(x, g, b):
        y0, c0 = ops.batch_norm_forward_reference(x, None, None, 1e-5)
        rr, dd = (v[None, :, None, None] for v in (r, d))
        y = g[None, :, None, None] * (rr * y0 + dd) + b[None, :, None, None]
        return y, cache

    results = gradcheck(frozen, ops.batch_renorm_backward, x, gamma, beta,
                        names=("x", "gamma", "beta"), rtol=RTOL)
    assert all(res.passed for res in results)


# -- fused numba kernels vs the plain NumPy code ---------------------------------

FUSED_SHAPES = [(4, 3, 5, 6), (8, 16, 7, 7), (6, 5, 1, 1), (2, 3, 9, 11), (16, 2, 3, 3)]


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_equals_reference(shape, chunk, dtype, rng):
    x = (rng.standard_normal(shape) * 2.5 + 0.7).astype(dtype)
    gamma = (rng.standard_normal(shape[1]) + 1).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, cache = ops.batch_norm_forward_fused(x, gamma, beta, 1e-5, chunk)
    y_ref, cache_ref = ops.batch_norm_forward_reference(x, gamma, beta, 1e-5, chunk)
    assert cache.fused and not cache_ref.fused
    assert y.dtype == dtype and y.shape == shape
    grads = ops.batch_norm_backward(dy, cache)  # follows the forward: fused
    grads_ref = ops.batch_norm_backward_reference(dy, cache_ref)
    if dtype == np.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:  # float32 element-wise rounding; sums accumulate in float64 on both paths
        tol = dict(rtol=2e-5, atol=2e-5 * np.sqrt(x.size / shape[1]))
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(cache.mean, cache_ref.mean, rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(cache.var, cache_ref.var, rtol=1e-5 if dtype == np.float32 else 1e-12)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, g_ref, **tol)


def test_fused_variance_survives_a_large_mean(rng):
    # shifted sums: E[x^2] - E[x]^2 in float32 would lose every digit here
    x = (1000.0 + 0.01 * rng.standard_normal((32, 4, 6, 6))).astype(np.float32)
    _, cache = ops.batch_norm_forward_fused(x, None, None, 1e-5)
    exact = x.astype(np.float64).var(axis=(0, 2, 3))
    assert cache.fused
    np.testing.assert_allclose(cache.var[0], exact, rtol=1e-6)


def test_fused_noncontiguous_input(rng):
    x = rng.standard_normal((5, 4, 6, 8)).transpose(0, 1, 3, 2)
    y, cache = ops.batch_norm_forward_fused(x, None, None, 1e-5)
    y_ref, _ = ops.batch_norm_forward_reference(x, None, None, 1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


def test_selector():
    big = np.random.default_rng(0).standard_normal((8, 16, 32, 32)).astype(np.float32)
    assert batchnorm.uses_fused_kernel(big)
    y, cache = ops.batch_norm_forward(big, None, None, 1e-5)
    assert cache.fused
    assert not batchnorm.uses_fused_kernel(big[:1, :1])                     # small: NumPy
    assert not batchnorm.uses_fused_kernel(big.reshape(8, -1))              # 2-D: NumPy
    assert not batchnorm.uses_fused_kernel(big.astype(np.float16))
    with pytest.raises(ValueError, match="4-D NumPy"):
        ops.batch_norm_forward_fused(big.reshape(8, -1), None, None, 1e-5)
    with config.using(bn_fused_min_size=0):
        assert ops.batch_norm_forward(big[:1, :2], None, None, 1e-5)[1].fused
    assert not ops.batch_norm_forward(big[:1, :2], None, None, 1e-5)[1].fused
    with config.using(use_numba=False):
        assert not batchnorm.uses_fused_kernel(big)
        y_plain, cache = ops.batch_norm_forward(big, None, None, 1e-5)
        assert not cache.fused
    np.testing.assert_allclose(y_plain, y, rtol=1e-5, atol=1e-5)


# -- batch norm invariants ---------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 2, 4])
def test_batch_norm_output_is_standardized_per_chunk(chunk, rng):
    x = rng.standard_normal((8, 3, 4, 4)) * np.array([0.5, 2.0, 7.0])[None, :, None, None] + 3.0
    eps = 1e-5
    y, cache = ops.batch_norm_forward(x, None, None, eps, chunk)
    k = chunk or 8
    for g in range(8 // k):
        part = y[g * k:(g + 1) * k]
        var_b = x[g * k:(g + 1) * k].var(axis=(0, 2, 3))
        np.testing.assert_allclose(part.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
        np.testing.assert_allclose(part.var(axis=(0, 2, 3)), var_b / (var_b + eps), rtol=1e-12)
        np.testing.assert_allclose(cache.var[g], var_b, rtol=1e-12)
    # paper 3.1: as eps -> 0 the output norm is sqrt(D), D = m H W C (eps must be > 0;
    # 1e-300 vanishes next to every variance here)
    y0, _ = ops.batch_norm_forward(x, None, None, 1e-300, chunk)
    assert np.linalg.norm(y0) == pytest.approx(math.sqrt(x.size), rel=1e-12)


def test_chunked_batch_norm_equals_separate_batches(rng):
    x = rng.standard_normal((6, 4, 3, 3))
    g, b = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)
    y, cache = ops.batch_norm_forward(x, g, b, 1e-5, chunk=2)
    dx, dg, db = ops.batch_norm_backward(dy, cache)
    parts = [ops.batch_norm_forward(x[i:i + 2], g, b, 1e-5) for i in (0, 2, 4)]
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), rtol=1e-12, atol=1e-12)
    grads = [ops.batch_norm_backward(dy[i:i + 2], p[1]) for i, p in zip((0, 2, 4), parts)]
    np.testing.assert_allclose(dx, np.concatenate([gr[0] for gr in grads]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg, sum(gr[1] for gr in grads), rtol=1e-10)
    np.testing.assert_allclose(db, sum(gr[2] for gr in grads), rtol=1e-10)
    np.testing.assert_allclose(cache.batch_mean, x.reshape(3, 2, 4, 9).mean(axis=(1, 3)).mean(0))


@pytest.mark.parametrize("shape", [(4, 3, 2, 1), (4, 3)])
def test_zero_variance_chunk_is_allowed(shape, rng):
    # every value of a chunk equal (but more than one of them): var = 0, y = beta,
    # dx = (dy - chunk mean of dy) / sqrt(eps), finite
    per_channel = rng.standard_normal(3).reshape((1, 3) + (1,) * (len(shape) - 2))
    x = np.broadcast_to(per_channel, shape).copy()
    beta = rng.standard_normal(3)
    y, cache = ops.batch_norm_forward(x, np.ones(3), beta, 1e-5, chunk=2)
    np.testing.assert_allclose(y.reshape(4, 3, -1),
                               np.broadcast_to(beta[:, None], (4, 3, y[0, 0].size)), atol=1e-12)
    assert np.all(cache.var == 0)
    dy = rng.standard_normal(shape)
    dx, dgamma, dbeta = ops.batch_norm_backward(dy, cache)
    chunks = dy.reshape((2, 2) + shape[1:])
    expected = (chunks - chunks.mean(axis=(1,) + tuple(range(3, chunks.ndim)), keepdims=True))
    np.testing.assert_allclose(dx, expected.reshape(shape) / np.sqrt(1e-5), rtol=1e-9)


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_reference", "batch_norm_fused",
                                "mean_only", "renorm"])
@pytest.mark.parametrize("shape, chunk", [((1, 3, 1, 1), None), ((1, 3), None),
                                          ((4, 3, 1, 1), 1), ((4, 3), 1)])
def test_one_value_per_channel_in_training_raises(op, shape, chunk, rng):
    # like PyTorch: x - mean would be 0 whatever x (y = beta, every gradient 0)
    x, g = rng.standard_normal(shape), np.ones(3)
    if op == "batch_norm_fused" and len(shape) == 2:
        pytest.skip("the fused kernels take 4-D input only")
    calls = {"batch_norm": lambda: ops.batch_norm_forward(x, g, g, 1e-5, chunk),
             "batch_norm_reference": lambda: ops.batch_norm_forward_reference(x, g, g, 1e-5, chunk),
             "batch_norm_fused": lambda: ops.batch_norm_forward_fused(x, g, g, 1e-5, chunk),
             "mean_only": lambda: ops.mean_only_batch_norm_forward(x, g, chunk),
             "renorm": lambda: ops.batch_renorm_forward(x, g, g, g * 0, g, 1e-5, 3.0, 5.0)}
    if op == "renorm" and chunk is not None:
        pytest.skip("batch renorm has no chunks")
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        calls[op]()
    # eval mode (fixed statistics) takes a single value
    y, _ = ops.batch_norm_inference_forward(x, g, g, g * 0, g, 1e-5)
    assert np.all(np.isfinite(y))


def test_batch_norm_layer_with_batch_of_one_raises_in_training_only(rng):
    from tinynorm import nn
    layer = nn.BatchNorm(3, dtype=np.float64)
    x = rng.standard_normal((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(x)
    layer.eval()
    assert layer.forward(x).shape == x.shape


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), True, "1e-5"])
def test_every_normalization_rejects_eps_that_is_not_positive(eps, rng):
    x, g = rng.standard_normal((4, 3, 2, 2)), np.ones(3)
    v = rng.standard_normal((3, 3, 3, 3))
    calls = [("batch_norm", lambda: ops.batch_norm_forward(x, g, g, eps)),
             ("batch_norm", lambda: ops.batch_norm_forward_reference(x, g, g, eps)),
             ("batch_norm_inference", lambda: ops.batch_norm_inference_forward(x, g, g, g, g, eps)),
             ("batch_renorm", lambda: ops.batch_renorm_forward(x, g, g, g, g, eps, 3.0, 5.0)),
             ("group_norm", lambda: ops.group_norm_forward(x, g, g, 3, eps)),
             ("group_norm", lambda: ops.layer_norm_forward(x, g, g, eps)),
             ("weight_norm", lambda: ops.weight_norm_forward(v, g, eps)),
             ("weight_norm", lambda: ops.wn_conv2d_forward(x, v, g, None, 1, 1, eps))]
    if ops.fused_kernel_available(x):
        calls.append(("batch_norm", lambda: ops.batch_norm_forward_fused(x, g, g, eps)))
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^{name}: eps must be a finite number > 0"):
            call()


def test_normalization_layers_reject_eps_that_is_not_positive(rng):
    from tinynorm import nn
    x = rng.standard_normal((4, 3, 5, 5))
    for layer in (nn.BatchNorm(3, eps=0.0, dtype=np.float64),
                  nn.GroupNorm(3, 3, eps=0.0, dtype=np.float64),
                  nn.WNConv2d(3, 4, 3, 1, 1, eps=0.0, rng=rng, dtype=np.float64)):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            layer.forward(x)


def test_batch_norm_inference_matches_hand_computation(rng):
    x = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    gamma, beta = np.array([2.0, 0.5], np.float32), np.array([0.1, -1.0], np.float32)
    mean, var = np.array([0.3, -0.2], np.float32), np.array([4.0, 0.25], np.float32)
    y, _ = ops.batch_norm_inference_forward(x, gamma, beta, mean, var, 1e-5)
    hand = np.empty_like(x, dtype=np.float64)
    for c in range(2):
        hand[:, c] = gamma[c] * (x[:, c] - mean[c]) / math.sqrt(var[c] + 1e-5) + beta[c]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, hand, rtol=1e-6, atol=1e-6)


# -- batch renorm --------------------------------------------------------------------

def test_batch_renorm_unclipped_equals_running_statistics(rng):
    x = rng.standard_normal((16, 3, 2, 2)) * 1.2 + 0.3
    gamma, beta = rng.standard_normal(3) + 1, rng.standard_normal(3)
    rmean, rvar = np.array([0.25, 0.35, 0.3]), np.array([1.4, 1.5, 1.6])
    y, cache = ops.batch_renorm_forward(x, gamma, beta, rmean, rvar, 1e-5, 10.0, 10.0)
    y_run, _ = ops.batch_norm_inference_forward(x, gamma, beta, rmean, rvar, 1e-5)
    np.testing.assert_allclose(y, y_run, rtol=1e-10, atol=1e-10)


def test_batch_renorm_clips_r_and_d_and_reduces_to_bn(rng):
    x = rng.standard_normal((10, 2, 3, 3)) * 2
    gamma, beta = np.ones(2), np.zeros(2)
    _, cache = ops.batch_renorm_forward(x, gamma, beta, np.array([500.0, -50.0]),
                                        np.array([1e4, 1e-4]), 1e-5, 2.0, 1.5)
    r, d = cache.extra
    np.testing.assert_allclose(r, [0.5, 2.0])
    np.testing.assert_allclose(d, [-1.5, 1.5])
    y_rn, _ = ops.batch_renorm_forward(x, gamma, beta, np.zeros(2), np.full(2, 9.0), 1e-5, 1.0, 0.0)
    y_bn, _ = ops.batch_norm_forward(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(y_rn, y_bn, rtol=1e-10, atol=1e-10)


# -- mean-only BN, layer norm, group norm --------------------------------------------

def test_mean_only_batch_norm_centres_without_scaling(rng):
    x = rng.standard_normal((5, 3, 4, 4)) * 3 + 2
    beta = np.array([0.5, -1.0, 2.0])
    y, cache = ops.mean_only_batch_norm_forward(x, beta)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), beta, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(cache.batch_mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_group_norm_special_cases(rng):
    x = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    # G = C is instance norm: each (n, c) map standardized on its own
    y, _ = ops.group_norm_forward(x, None, None, 4, 1e-300)   # (var + eps == var)
    inst = (x - x.mean(axis=(2, 3), keepdims=True)) / x.std(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, inst, rtol=1e-10, atol=1e-12)
    # G = 1 is layer norm
    y1, _ = ops.group_norm_forward(x, gamma, beta, 1, 1e-5)
    yl, _ = ops.layer_norm_forward(x, gamma, beta, 1e-5)
    np.testing.assert_array_equal(y1, yl)
    # layer norm standardizes every sample over (C, H, W)
    y0, _ = ops.layer_norm_forward(x, None, None, 1e-300)
    np.testing.assert_allclose(y0.reshape(3, -1).mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(y0.reshape(3, -1).var(axis=1), 1, rtol=1e-12)


def test_group_norm_float32_keeps_dtype(rng):
    x = rng.standard_normal((2, 6, 3, 3)).astype(np.float32)
    g = np.ones(6, np.float32)
    y, cache = ops.group_norm_forward(x, g, g * 0, 3, 1e-5)
    dx, dg, db = ops.group_norm_backward(np.ones_like(x), cache)
    assert y.dtype == dx.dtype == dg.dtype == db.dtype == np.float32


# -- weight norm -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 5)])
@pytest.mark.parametrize("eps", [1e-12, 1e-2])
def test_weight_norm_invariants(shape, eps, rng):
    v = rng.standard_normal(shape)
    g = np.abs(rng.standard_normal(shape[0])) + 0.5
    w, cache = ops.weight_norm_forward(v, g, eps)
    axes = tuple(range(1, v.ndim))
    v_norm = np.sqrt((v ** 2).sum(axis=axes))
    np.testing.assert_allclose(np.sqrt((w ** 2).sum(axis=axes)), g / (1 + eps / v_norm),
                               rtol=1e-12)
    dw = rng.standard_normal(shape)
    dv, dg = ops.weight_norm_backward(dw, cache)
    v_dot_dv = (v * dv).sum(axis=axes)
    dot = (dw * v).sum(axis=axes)
    # g eps (dw . v) / n^2: orthogonal to v as eps -> 0
    np.testing.assert_allclose(v_dot_dv, g * eps * dot / (v_norm + eps) ** 2, atol=1e-12)
    np.testing.assert_allclose(dg, dot / (v_norm + eps), rtol=1e-12)


def test_weight_norm_zero_row_and_no_gain(rng):
    v = rng.standard_normal((3, 4))
    v[1] = 0
    w, cache = ops.weight_norm_forward(v, None, 1e-3)
    dw = rng.standard_normal(v.shape)
    dv, dg = ops.weight_norm_backward(dw, cache)
    assert dg is None and np.all(np.isfinite(dv))
    np.testing.assert_allclose(dv[1], dw[1] / 1e-3)
    np.testing.assert_allclose(np.linalg.norm(w[[0, 2]], axis=1),
                               1 / (1 + 1e-3 / np.linalg.norm(v[[0, 2]], axis=1)), rtol=1e-12)


# -- NormProp ----------------------------------------------------------------------------

def test_normprop_constants():
    assert round(normprop.NORMPROP_C0, 6) == 0.398942
    assert round(normprop.NORMPROP_C1, 6) == 1.712859
    # the known bug: sqrt(pi/2) = 1.253314 in place of either constant
    assert abs(normprop.NORMPROP_C1 - math.sqrt(math.pi / 2)) > 0.4
    assert abs(normprop.NORMPROP_C0 - math.sqrt(math.pi / 2)) > 0.8
    # c0 = E[relu(z)], 1/c1^2 = Var[relu(z)] for z ~ N(0, 1), in closed form
    assert normprop.NORMPROP_C0 == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-15)
    assert 1 / normprop.NORMPROP_C1 ** 2 == pytest.approx(0.5 - 1 / (2 * math.pi), rel=1e-15)


def test_normprop_relu_standardizes_a_standard_normal():
    z = np.random.default_rng(0).standard_normal(2_000_000)
    y, _ = ops.normprop_relu_forward(z)
    # sampling error of the mean / variance of 2e6 draws is about 1e-3
    assert abs(y.mean()) < 4e-3
    assert abs(y.var() - 1) < 6e-3


def test_normprop_relu_values_and_dtype():
    z = np.array([-1.0, 0.0, 2.0], np.float32)
    y, cache = ops.normprop_relu_forward(z)
    c0, c1 = normprop.NORMPROP_C0, normprop.NORMPROP_C1
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [-c1 * c0, -c1 * c0, c1 * (2 - c0)], rtol=1e-6)
    (dz,) = ops.normprop_relu_backward(np.ones(3, np.float32), cache)
    np.testing.assert_allclose(dz, [0, 0, c1], rtol=1e-6)


# -- TReLU ---------------------------------------------------------------------------------

def test_trelu_is_max_of_x_and_alpha(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    alpha = np.array([-0.5, 0.0, 0.7])
    y, cache = ops.trelu_forward(x, alpha)
    np.testing.assert_array_equal(y, np.maximum(x, alpha[None, :, None, None]))
    dx, dalpha = ops.trelu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dalpha, (x <= alpha[None, :, None, None]).sum(axis=(0, 2, 3)))
    np.testing.assert_array_equal(dx, x > alpha[None, :, None, None])


# -- bad input -------------------------------------------------------------------------------

X4 = np.zeros((4, 3, 2, 2))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.batch_norm_forward(np.zeros((4, 3, 2)), None, None, 1e-5), "2-D .* or 4-D"),
    (lambda: ops.batch_norm_forward(X4, np.ones(4), None, 1e-5), "gamma has shape"),
    (lambda: ops.batch_norm_forward(X4, None, np.ones(2), 1e-5), "beta has shape"),
    (lambda: ops.batch_norm_forward(X4, None, None, 1e-5, chunk=3), "not divisible by chunk"),
    (lambda: ops.batch_norm_forward(X4, None, None, 1e-5, chunk=0), "positive integer"),
    (lambda: ops.batch_norm_forward_reference(X4, None, None, 1e-5, chunk=3), "not divisible"),
    (lambda: ops.batch_norm_forward(np.zeros((4, 3), int), None, None, 1e-5), "floating-point"),
    (lambda: ops.batch_norm_forward(np.zeros((0, 3)), None, None, 1e-5), "x is empty"),
    (lambda: ops.batch_norm_forward(np.zeros((2, 3, 0, 4)), None, None, 1e-5), "x is empty"),
    (lambda: ops.mean_only_batch_norm_forward(X4, np.ones(2)), "beta has shape"),
    (lambda: ops.batch_renorm_forward(X4, None, None, np.zeros(3), np.ones(2), 1e-5, 3, 5),
     "running_var has shape"),
    (lambda: ops.batch_renorm_forward(X4, None, None, np.zeros(3), np.ones(3), 1e-5, 0.5, 5),
     "r_max >= 1"),
    (lambda: ops.batch_norm_inference_forward(X4, None, None, np.zeros(2), np.ones(3), 1e-5),
     "mean has shape"),
    (lambda: ops.group_norm_forward(X4, None, None, 2, 1e-5), "cannot be split into 2 groups"),
    (lambda: ops.group_norm_forward(X4, np.ones(2), None, 1, 1e-5), "gamma has shape"),
    (lambda: ops.layer_norm_forward(np.zeros(4), None, None, 1e-5), "at least 2 dims"),
    (lambda: ops.weight_norm_forward(np.ones(4), None, 1e-5), "at least 2-D"),
    (lambda: ops.weight_norm_forward(np.ones((4, 2)), np.ones(3), 1e-5), "g has shape"),
    (lambda: ops.trelu_forward(X4, np.zeros(4)), "alpha has shape"),
    (lambda: ops.scale_shift_forward(X4, np.zeros(2), None), "gamma has shape"),
    (lambda: ops.normprop_relu_forward(np.zeros(3, int)), "floating-point"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- CuPy (array-generic code) ---------------------------------------------------------------

@pytest.mark.gpu
def test_norm_ops_on_cupy_match_numpy(rng):
    import cupy
    x = rng.standard_normal((4, 3, 5, 5))
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    for fwd, args in [(ops.batch_norm_forward, (g, b, 1e-5, 2)),
                      (ops.group_norm_forward, (g, b, 3, 1e-5)),
                      (ops.trelu_forward, (g,))]:
        y_np, _ = fwd(x, *args)
        y_cp, _ = fwd(cupy.asarray(x), *[cupy.asarray(a) if isinstance(a, np.ndarray) else a
                                          for a in args])
        np.testing.assert_allclose(cupy.asnumpy(y_cp), y_np, rtol=1e-10, atol=1e-10)


def test_channel_blocks_cover_every_channel_and_fit_l2():
    from tinynorm.ops._bn_numba import channel_block
    for k, c, s, itemsize in [(128, 2048, 49, 4), (128, 128, 784, 4), (128, 16, 49, 8),
                              (4, 5, 1, 8), (128, 64, 12544, 4)]:
        cb = channel_block(k, c, s, itemsize)
        assert 1 <= cb <= c
        # a block of x and dy stays within the L2 budget unless one channel alone exceeds it
        assert cb == 1 or 2 * cb * k * s * itemsize <= 512 * 1024
    assert channel_block(128, 2048, 49, 4) > 1        # 7x7 maps: several channels per block
    assert channel_block(128, 128, 784, 4) == 1       # 28x28 maps: one channel per block


def _f32(*shape):
    return np.random.default_rng(5).standard_normal(shape).astype(np.float32)


FLOAT32_CASES = [
    ("batch_norm 2-D", lambda: ops.batch_norm_forward(_f32(8, 3), _f32(3), _f32(3), 1e-5),
     ops.batch_norm_backward),
    ("batch_norm_inference", lambda: ops.batch_norm_inference_forward(
        _f32(4, 3, 2, 2), _f32(3), _f32(3), _f32(3), np.ones(3, np.float32), 1e-5),
     ops.batch_norm_inference_backward),
    ("mean_only_batch_norm", lambda: ops.mean_only_batch_norm_forward(_f32(4, 3, 2, 2), _f32(3)),
     ops.mean_only_batch_norm_backward),
    ("batch_renorm", lambda: ops.batch_renorm_forward(_f32(4, 3, 2, 2), _f32(3), _f32(3),
                                                      _f32(3), np.ones(3, np.float32), 1e-5,
                                                      3.0, 5.0), ops.batch_renorm_backward),
    ("weight_norm", lambda: ops.weight_norm_forward(_f32(4, 3, 3, 3), _f32(4), 1e-8),
     ops.weight_norm_backward),
    ("trelu", lambda: ops.trelu_forward(_f32(4, 3, 2, 2), _f32(3)), ops.trelu_backward),
    ("scale_shift", lambda: ops.scale_shift_forward(_f32(4, 3), _f32(3), _f32(3)),
     ops.scale_shift_backward),
    ("layer_norm", lambda: ops.layer_norm_forward(_f32(4, 3, 2, 2), _f32(3), _f32(3), 1e-5),
     ops.layer_norm_backward),
]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=[c[0] for c in FLOAT32_CASES])
def test_float32_in_float32_out(case):
    label, forward, backward = case
    y, cache = forward()
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    grads = backward(np.ones_like(y), cache)
    assert all(g.dtype == np.float32 for g in grads if g is not None)

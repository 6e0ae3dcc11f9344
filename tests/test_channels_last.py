"""Channels-last activations (tinynorm.ops.layout) and the oneDNN convolution plan.

The same values in either memory layout: every op given a channels-last
array answers as it does for the NCHW array (float64, to round-off), in
channels-last memory; a whole training step with the ``channels_last``
setting equals the NCHW step.  oneDNN (float32 only) is held to the float64
reference convolution.  The oneDNN tests skip when its library does not load,
and fail instead under TINYNORM_REQUIRE_ONEDNN=1 (CI sets it).
"""
import os

import numpy as np
import pytest

from model_steps import CASE_IDS, MODEL_CASES, sgd_steps
from tinynorm import gradcheck, ops, settings
from tinynorm.ops import batchnorm as bn
from tinynorm.ops import layout
from tinynorm.ops.conv import onednn

cl = layout.to_channels_last
is_cl = layout.is_channels_last

ONEDNN_OK, ONEDNN_WHY = onednn.status()
if os.environ.get("TINYNORM_REQUIRE_ONEDNN") == "1" and not ONEDNN_OK:
    raise RuntimeError(f"TINYNORM_REQUIRE_ONEDNN=1 but {ONEDNN_WHY}")
needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason=ONEDNN_WHY)


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------

def test_layout_is_read_from_the_strides():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    assert not is_cl(x)
    y = cl(x)
    assert is_cl(y) and y.shape == x.shape and np.array_equal(y, x)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert cl(y) is y                                   # no copy when already so
    back = layout.to_nchw(y)
    assert back.flags.c_contiguous and np.array_equal(back, x)
    # C == 1 or a 1x1 map is both layouts at once: it counts as NCHW
    assert not is_cl(cl(np.ones((2, 1, 4, 5))))
    assert not is_cl(cl(np.ones((2, 3, 1, 1))))
    assert not is_cl(np.ones((6, 4)))
    # flat: memory order, i.e. NHWC order for channels-last
    assert np.array_equal(layout.flat(y), x.transpose(0, 2, 3, 1).reshape(-1))
    with pytest.raises(ValueError, match="neither C-contiguous nor channels-last"):
        layout.flat(x[:, :, ::2])
    assert is_cl(layout.like(x, y)) and layout.like(y, x).flags.c_contiguous
    e = layout.empty_like_layout(y, (2, 7, 3, 3))
    assert e.shape == (2, 7, 3, 3) and is_cl(e)


# ----------------------------------------------------------------------------
# convolution: hand-written plans and the channels_last setting
# ----------------------------------------------------------------------------

# (x shape, C_out, kernel, stride, pad): Winograd, 1x1, strided 1x1, im2col, stem
CONV_CASES = [
    ((3, 16, 8, 8), 16, 3, 1, 1),
    ((3, 8, 6, 7), 12, 1, 1, 0),
    ((3, 8, 6, 7), 12, 1, 2, 0),
    ((2, 6, 9, 8), 5, 3, 2, 1),
    ((2, 3, 9, 9), 8, 3, 1, 1),
]


def _conv_case(shape, c_out, k, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((c_out, shape[1], k, k)) / np.sqrt(shape[1] * k * k)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("shape,c_out,k,s,p", CONV_CASES)
def test_conv_answers_in_the_layout_of_its_input(shape, c_out, k, s, p):
    x, w, b = _conv_case(shape, c_out, k)
    y0, c0 = ops.conv2d_forward(x, w, b, s, p)
    dy = np.random.default_rng(1).standard_normal(y0.shape)
    dx0, dw0, db0 = ops.conv2d_backward(dy, c0)
    y1, c1 = ops.conv2d_forward(cl(x), w, b, s, p)
    assert c1.plan.algorithm == c0.plan.algorithm       # the same plan, on an NCHW copy
    assert is_cl(y1) and rel(y1, y0) < 1e-14
    dx1, dw1, db1 = ops.conv2d_backward(cl(dy), c1)
    assert is_cl(dx1)
    assert rel(dx1, dx0) < 1e-14 and rel(dw1, dw0) < 1e-14 and rel(db1, db0) < 1e-14
    # the setting: an NCHW input gives a channels-last output, and dx comes back NCHW
    with settings.using(channels_last=True):
        y2, c2 = ops.conv2d_forward(x, w, b, s, p)
    assert is_cl(y2) and rel(y2, y0) < 1e-14
    dx2 = ops.conv2d_backward(dy, c2)[0]
    assert dx2.flags.c_contiguous and rel(dx2, dx0) < 1e-14


def test_conv_gradients_of_a_channels_last_input_pass_gradcheck():
    x, w, b = _conv_case((2, 4, 5, 6), 3, 3)
    results = gradcheck.gradcheck(ops.conv2d_forward, ops.conv2d_backward, cl(x), w, b, 1, 1,
                                  names=("x", "w", "b", "stride", "pad"))
    assert {r.name for r in results} == {"x", "w", "b"}


# ----------------------------------------------------------------------------
# batch norm, pooling, ReLU
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("shape,chunk,affine", [
    ((8, 16, 12, 12), None, True), ((8, 16, 12, 12), 2, True), ((4, 40, 7, 9), 4, False),
    ((6, 3, 30, 30), None, True)])
def test_batch_norm_channels_last_kernels_match_the_array_code(dtype, tol, shape, chunk,
                                                                affine):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)      # a mean to take off
    g = rng.standard_normal(shape[1]).astype(dtype) if affine else None
    b = rng.standard_normal(shape[1]).astype(dtype) if affine else None
    dy = rng.standard_normal(shape).astype(dtype)
    y0, c0 = bn.batch_norm_forward_reference(x, g, b, 1e-5, chunk)
    dx0, dg0, db0 = bn.batch_norm_backward_reference(dy, c0)
    with settings.using(bn_fused_min_size=0):
        assert bn.uses_channels_last_kernel(cl(x)) and not bn.uses_channels_last_kernel(x)
        y1, c1 = ops.batch_norm_forward(cl(x), g, b, 1e-5, chunk)
    assert c1.fused == "channels_last"
    dx1, dg1, db1 = ops.batch_norm_backward(dy, c1)       # an NCHW dy is taken too
    assert is_cl(y1) and is_cl(dx1)
    assert rel(y1, y0) < tol and rel(dx1, dx0) < tol
    np.testing.assert_allclose(c1.var, c0.var, rtol=tol)
    if affine:
        assert rel(dg1, dg0) < tol and rel(db1, db0) < tol
    else:
        assert dg1 is None and db1 is None


def test_batch_norm_variants_keep_the_layout():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5, 6, 7))
    dy = rng.standard_normal(x.shape)
    g, b = rng.standard_normal(5), rng.standard_normal(5)
    m, v = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    pairs = [
        (lambda a: bn.batch_norm_forward_reference(a, g, b, 1e-5, 2), bn.batch_norm_backward),
        (lambda a: ops.batch_norm_inference_forward(a, g, b, m, v, 1e-5),
         ops.batch_norm_inference_backward),
        (lambda a: ops.mean_only_batch_norm_forward(a, b, 2), ops.mean_only_batch_norm_backward),
        (lambda a: ops.batch_renorm_forward(a, g, b, m, v, 1e-5, 1.5, 0.5),
         ops.batch_renorm_backward),
    ]
    for forward, backward in pairs:
        y0, c0 = forward(x)
        g0 = backward(dy, c0)
        y1, c1 = forward(cl(x))
        g1 = backward(cl(dy), c1)
        assert is_cl(y1) and is_cl(g1[0]) and rel(y1, y0) < 1e-13
        for a, r in zip(g1, g0):
            assert (a is None) == (r is None)
            if a is not None:
                assert rel(a, r) < 1e-13


@pytest.mark.parametrize("numba_on", [True, False])
@pytest.mark.parametrize("shape,k,s,p", [((4, 5, 9, 8), 3, 2, 1), ((2, 3, 7, 7), 2, 1, 0),
                                         ((1, 2, 6, 7), (3, 2), (1, 2), (1, 0))])
def test_max_pool_channels_last_is_exact(numba_on, shape, k, s, p):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    x[x < 0] = 0                                    # ties, as after a ReLU
    with settings.using(use_numba=numba_on):
        y0, c0 = ops.max_pool2d_forward(x, k, s, p)
        dy = rng.standard_normal(y0.shape)
        (dx0,) = ops.max_pool2d_backward(dy, c0)
        y1, c1 = ops.max_pool2d_forward(cl(x), k, s, p)
        (dx1,) = ops.max_pool2d_backward(cl(dy), c1)
    assert c1[0] == ("channels_last_numba" if numba_on else "channels_last")
    assert is_cl(y1) and is_cl(dx1)
    assert np.array_equal(y1, y0) and np.array_equal(dx1, dx0)   # same max, same argmax


def test_max_pool_channels_last_propagates_nan():
    x = np.random.default_rng(6).standard_normal((2, 3, 6, 6))
    x[0, 1, 2, 2] = np.nan
    y0, _ = ops.max_pool2d_forward(x, 3, 2, 1)
    y1, _ = ops.max_pool2d_forward(cl(x), 3, 2, 1)
    assert np.isnan(y1).sum() == np.isnan(y0).sum() > 0
    assert np.array_equal(y1, y0, equal_nan=True)


@pytest.mark.parametrize("k,s,p", [((5, 6), 1, 0), (3, 2, 1)])
def test_avg_pool_channels_last(k, s, p):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 5, 6))
    y0, c0 = ops.avg_pool2d_forward(x, k, s, p)
    dy = rng.standard_normal(y0.shape)
    (dx0,) = ops.avg_pool2d_backward(dy, c0)
    y1, c1 = ops.avg_pool2d_forward(cl(x), k, s, p)
    (dx1,) = ops.avg_pool2d_backward(dy, c1)
    assert c1[0] == ("channels_last_global" if k == (5, 6) else "channels_last")
    assert rel(y1, y0) < 1e-14 and rel(dx1, dx0) < 1e-14 and is_cl(dx1)


def test_relu_keeps_the_layout_and_pairs_dy_with_y():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    y, cache = ops.relu_forward(cl(x))
    assert is_cl(y) and np.array_equal(y, np.maximum(x, 0))
    (dx,) = ops.relu_backward(dy, cache)              # NCHW dy against channels-last y
    assert is_cl(dx) and np.array_equal(dx, np.where(x > 0, dy, 0))


# ----------------------------------------------------------------------------
# a whole training step
# ----------------------------------------------------------------------------

MODEL_KW = {
    "cifar10_nv": dict(in_channels=3, width=1 / 16, input=(3, 28, 28)),
    "resnet50": dict(in_channels=3, width=1 / 32, stem="cifar", input=(3, 16, 16)),
}
IMAGE_CASES = [(c, i) for c, i in zip(MODEL_CASES, CASE_IDS) if c[0] in MODEL_KW]


def _steps(model_name, norm, **overrides):
    with settings.using(bn_fused_min_size=0, **overrides):
        losses, model, _ = sgd_steps(model_name, norm, MODEL_KW[model_name], batch=4)
    return losses, {k: np.array(v) for k, v in model.parameters().items()}


@pytest.mark.parametrize("model_name,norm", [c for c, _ in IMAGE_CASES],
                         ids=[i for _, i in IMAGE_CASES])
def test_training_steps_with_channels_last_equal_the_nchw_steps(model_name, norm):
    # Each op agrees to 1e-12 or better (above); two SGD steps through a deep
    # BN network amplify the round-off of different summation orders: for
    # ResNet-50 BN here, the NCHW fused kernels and the NCHW array code end
    # 3e-11 apart in a parameter, channels-last and NCHW 1.3e-10.
    losses0, params0 = _steps(model_name, norm)
    losses1, params1 = _steps(model_name, norm, channels_last=True)
    np.testing.assert_allclose(losses1, losses0, rtol=1e-12)
    assert params1.keys() == params0.keys()
    for name in params0:
        assert rel(params1[name], params0[name]) < 1e-9, name


# ----------------------------------------------------------------------------
# oneDNN
# ----------------------------------------------------------------------------

ONEDNN_CASES = CONV_CASES + [((2, 8, 5, 7), 6, (2, 3), (2, 1), (1, 2))]


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,c_out,k,s,p", ONEDNN_CASES)
def test_onednn_plan_matches_the_float64_reference(shape, c_out, k, s, p, bias, channels_last):
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((c_out, shape[1], kh, kw)) / np.sqrt(shape[1] * kh * kw)
    b = rng.standard_normal(c_out) if bias else None
    y_ref, cache_ref = ops.conv2d_reference_forward(x, w, b, s, p)
    dy = rng.standard_normal(y_ref.shape)
    dx_ref, dw_ref, db_ref = ops.conv2d_reference_backward(dy, cache_ref)
    x32 = x.astype(np.float32)
    x32 = cl(x32) if channels_last else x32
    # channels_last=False: an NCHW input stays NCHW (oneDNN's gemm kernels);
    # with the default "auto" it would answer channels-last (tested below)
    with settings.using(use_onednn=True, channels_last=False):
        y, cache = ops.conv2d_forward(x32, w.astype(np.float32),
                                      None if b is None else b.astype(np.float32), s, p)
    assert cache.plan.algorithm == "onednn"
    dx, dw, db = ops.conv2d_backward(dy.astype(np.float32), cache)
    assert is_cl(y) == channels_last and is_cl(dx) == channels_last
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert rel(got, ref) < 2e-6
    assert (db is None) == (b is None)
    if b is not None:
        assert rel(db, db_ref) < 2e-6
    # only the input gradient, or only the parameters'
    assert rel(ops.conv2d_backward_data(dy.astype(np.float32), cache), dx_ref) < 2e-6
    dw2, db2 = ops.conv2d_backward_filter(dy.astype(np.float32), cache)
    assert rel(dw2, dw_ref) < 2e-6 and (db2 is None) == (b is None)


@needs_onednn
def test_onednn_is_chosen_only_where_asked_and_for_float32():
    with settings.using(use_onednn=False):
        assert ops.conv_plan((4, 8, 6, 6), (8, 8, 3, 3), 1, 1).algorithm != "onednn"
    # the default: float32 on oneDNN, and its output channels-last ("auto")
    x = np.ones((4, 8, 6, 6), np.float32)
    y, cache = ops.conv2d_forward(x, np.ones((8, 8, 3, 3), np.float32), None, 1, 1)
    assert cache.plan.algorithm == "onednn" and is_cl(y)
    dx = ops.conv2d_backward(np.ones(y.shape, np.float32), cache)[0]
    assert dx.flags.c_contiguous                      # in the caller's layout
    y64, cache64 = ops.conv2d_forward(x.astype(np.float64), np.ones((8, 8, 3, 3)), None, 1, 1)
    assert cache64.plan.algorithm != "onednn" and y64.flags.c_contiguous
    with settings.using(use_onednn=True):
        assert ops.conv_plan((4, 8, 6, 6), (8, 8, 3, 3), 1, 1).algorithm == "onednn"
        assert ops.conv_plan((4, 8, 6, 6), (8, 8, 3, 3), 1, 1,
                             np.float64).algorithm != "onednn"
        names = onednn.impl_names(cl(np.zeros((4, 8, 6, 6), np.float32)),
                                  np.zeros((8, 8, 3, 3), np.float32), None,
                                  ops.conv_plan((4, 8, 6, 6), (8, 8, 3, 3), 1, 1))
    assert set(names) == {"forward", "backward_data", "backward_weights"}
    assert all(isinstance(v, str) and v for v in names.values())


def test_without_the_library_the_hand_written_plans_run(monkeypatch):
    monkeypatch.setenv("TINYNORM_DNNL_LIB", "/nonexistent/libdnnl.so.3")
    monkeypatch.setattr(onednn, "_state", {})
    ok, why = onednn.status()
    assert not ok and "libdnnl does not load" in why
    with settings.using(use_onednn=True):
        plan = ops.conv_plan((4, 8, 6, 6), (8, 8, 3, 3), 1, 1)
    assert plan.algorithm == "im2col"      # 8 channels: below winograd_min_channels


@needs_onednn
@pytest.mark.parametrize("model_name,norm", [("cifar10_nv", "bn"), ("resnet50", "wn")])
def test_float32_onednn_channels_last_steps_follow_the_float64_steps(model_name, norm):
    losses64, _ = _steps(model_name, norm)
    with settings.using(use_onednn=True, channels_last=True):
        losses32, model, _ = sgd_steps(model_name, norm, MODEL_KW[model_name], batch=4,
                                       dtype=np.float32)
    np.testing.assert_allclose(losses32, losses64, rtol=1e-4)


def test_parallel_residual_sum_equals_numpy_in_every_layout():
    from tinynorm.ops._elementwise import add, add_into
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    for x, y, want_cl in [(a, b, False), (cl(a), cl(b), True), (a, cl(b), None)]:
        s = add(x, y)
        assert np.array_equal(s, a + b)
        if want_cl is not None:                     # mixed layouts: NumPy's choice
            assert is_cl(s) == want_cl
        t = x.copy(order="K")
        assert add_into(t, y) is t and np.array_equal(t, a + b)
    with settings.using(use_numba=False):
        assert np.array_equal(add(cl(a), cl(b)), a + b)


# ----------------------------------------------------------------------------
# finite differences (float64) through the channels-last kernels themselves
# ----------------------------------------------------------------------------

def _cl_args(*arrays):
    return [cl(a) if getattr(a, "ndim", 0) == 4 else a for a in arrays]


def test_channels_last_batch_norm_kernels_pass_gradcheck():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    paths = set()

    def forward(*args):
        y, cache = ops.batch_norm_forward(*args)
        paths.add(cache.fused)
        return y, cache
    with settings.using(bn_fused_min_size=0):
        results = gradcheck.gradcheck(forward, ops.batch_norm_backward,
                                      *_cl_args(x, g, b), 1e-5, 2,
                                      names=("x", "gamma", "beta", "eps", "chunk"))
    assert paths == {"channels_last"}                # gradcheck kept the layout
    assert {r.name for r in results} == {"x", "gamma", "beta"}


def test_channels_last_pooling_kernels_pass_gradcheck():
    rng = np.random.default_rng(12)
    x = rng.permutation(np.arange(2 * 3 * 7 * 6, dtype=np.float64)).reshape(2, 3, 7, 6) * 0.1
    for op, backward, args, path in [
            (ops.max_pool2d_forward, ops.max_pool2d_backward, (cl(x), 3, 2, 1),
             "channels_last_numba"),
            (ops.avg_pool2d_forward, ops.avg_pool2d_backward, (cl(x), (7, 6), 1, 0),
             "channels_last_global")]:
        paths = set()

        def forward(*a, op=op, paths=paths):
            y, cache = op(*a)
            paths.add(cache[0])
            return y, cache
        results = gradcheck.gradcheck(forward, backward, *args,
                                      names=("x", "kernel", "stride", "pad"))
        assert paths == {path} and [r.name for r in results] == ["x"]

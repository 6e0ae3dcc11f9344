"""The convolution plan: which algorithm representative shapes get, that the
forward records it and the backward follows it whatever the settings are by
then, and its errors and repr."""
import dataclasses

import numpy as np
import pytest

from tinynorm import backend, config, ops
from tinynorm.ops.conv import cudnn


@pytest.fixture(autouse=True)
def _hand_written_plans():
    """These tests pin the hand-written CPU plans' rules; float32 would take
    oneDNN's plan by default (use_onednn) where its library loads."""
    with config.using(use_onednn=False):
        yield

# x shape, w shape, stride, pad, settings, dtype, expected algorithm
PLANS = [
    ((8, 32, 14, 14), (64, 32, 1, 1), 1, 0, {}, np.float32, "pointwise"),
    ((8, 320, 5, 5), (320, 320, 1, 1), 1, 0, {}, np.float32, "pointwise"),
    ((8, 32, 28, 28), (32, 32, 3, 3), 1, 1, {}, np.float32, "winograd4"),
    ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1, {}, np.float32, "winograd2"),      # auto: 14x14
    ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1, {"winograd_tile": 4}, np.float32, "winograd4"),
    ((8, 16, 14, 14), (16, 16, 3, 3), 1, 0, {}, np.float64, "winograd4"),
    ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1, {"winograd_tile": 2}, np.float32, "winograd2"),
    ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1, {"winograd": False}, np.float32, "im2col"),
    ((8, 32, 14, 14), (32, 32, 3, 3), 2, 1, {}, np.float32, "im2col"),
    ((8, 3, 28, 28), (128, 3, 3, 3), 1, 1, {}, np.float32, "im2col"),      # 3 input channels
    ((8, 32, 14, 14), (64, 32, 1, 1), 2, 0, {}, np.float32, "im2col"),     # 1x1 stride 2
    ((8, 32, 14, 14), (64, 32, 1, 1), 1, 1, {}, np.float32, "im2col"),     # 1x1 padded
    ((8, 16, 14, 14), (16, 16, 5, 5), 1, 2, {}, np.float32, "im2col"),
    ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1, {"use_numba": False}, np.float32, "generic"),
]


@pytest.mark.parametrize("x_shape,w_shape,stride,pad,settings,dtype,expected", PLANS,
                         ids=[f"{p[-1]}-{i}" for i, p in enumerate(PLANS)])
def test_representative_shapes_get_their_algorithm(x_shape, w_shape, stride, pad, settings,
                                                   dtype, expected):
    with config.using(**settings):
        plan = ops.conv_plan(x_shape, w_shape, stride, pad, dtype)
    assert plan.algorithm == expected
    assert plan.x_shape == x_shape and plan.w_shape == w_shape and plan.kernel == w_shape[2:]
    assert plan.stride == (stride, stride) and plan.pad == (pad, pad)
    assert plan.dtype == np.dtype(dtype)
    if expected != "pointwise":
        assert not plan.stacked


def test_pointwise_stacks_unless_narrow_planes_and_many_channels():
    assert ops.conv_plan((8, 32, 14, 14), (64, 32, 1, 1)).stacked          # 196 pixels
    assert ops.conv_plan((8, 320, 5, 5), (10, 320, 1, 1)).stacked          # 10 outputs
    assert not ops.conv_plan((8, 320, 5, 5), (320, 320, 1, 1)).stacked


def test_gpu_plans():
    shapes = ((8, 32, 14, 14), (32, 32, 3, 3), 1, 1)
    with config.using(use_cudnn=False):
        assert ops.conv_plan(*shapes, backend="gpu").algorithm == "generic"
    want = "cudnn" if cudnn.available() else "generic"
    assert ops.conv_plan(*shapes, backend="gpu").algorithm == want
    assert ops.conv_plan(*shapes, backend=np).algorithm == "winograd2"
    with pytest.raises(ValueError, match="conv_plan: backend must be 'cpu', 'gpu'"):
        ops.conv_plan(*shapes, backend="tpu")


def test_forward_records_the_plan_conv_plan_returns(rng):
    outer = config.current()
    x = rng.standard_normal((4, 16, 9, 9)).astype(np.float32)
    for w_shape, stride, pad in [((16, 16, 3, 3), 1, 1), ((8, 16, 1, 1), 1, 0),
                                 ((8, 16, 3, 3), 2, 1)]:
        w = rng.standard_normal(w_shape).astype(np.float32)
        for settings in [{}, {"winograd_tile": 2, "conv_chunk_bytes": 1}]:
            with config.using(**settings):
                _, cache = ops.conv2d_forward(x, w, None, stride, pad)
                assert cache.plan == ops.conv_plan(x.shape, w.shape, stride, pad, x.dtype)
            assert cache.plan.settings == dataclasses.replace(outer, **settings)


# Each case: the settings of the forward, then the settings the backward is
# called under, which on their own would choose another algorithm or chunking.
FOLLOW_CASES = [
    ({"winograd_tile": 2}, {"winograd_tile": 4}),
    ({}, {"winograd": False}),
    ({"winograd": False}, {"winograd": False, "conv_chunk_bytes": 1, "conv_threads": 2}),
    ({}, {"use_numba": False}),
]


@pytest.mark.parametrize("forward_settings,backward_settings", FOLLOW_CASES)
def test_backward_follows_the_forwards_plan(rng, forward_settings, backward_settings):
    """In float32 the algorithms round differently, so the backward's bits tell
    which algorithm ran: they must be those of the forward's plan."""
    x = rng.standard_normal((4, 16, 10, 10)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    dy = rng.standard_normal((4, 16, 10, 10)).astype(np.float32)
    with config.using(**forward_settings):
        _, cache = ops.conv2d_forward(x, w, b, 1, 1)
        want = ops.conv2d_backward(dy, cache)
    with config.using(**backward_settings):
        got = ops.conv2d_backward(dy, cache)
        got_dx = ops.conv2d_backward_data(dy, cache)
        got_dw, got_db = ops.conv2d_backward_filter(dy, cache)
        # what the backward's settings would have done on their own: distinguishable
        _, other = ops.conv2d_forward(x, w, b, 1, 1)
        other_grads = ops.conv2d_backward(dy, other)
    assert other.plan != cache.plan
    for g, g_want in zip(got, want):
        np.testing.assert_array_equal(g, g_want)
    np.testing.assert_array_equal(got_dx, want[0])
    np.testing.assert_array_equal(got_dw, want[1])
    np.testing.assert_array_equal(got_db, want[2])
    assert any(not np.array_equal(g, g_want) for g, g_want in zip(other_grads, want))


@pytest.mark.parametrize("x_shape, w_shape, pad, settings, tile", [
    ((8, 32, 28, 28), (32, 32, 3, 3), 1, {}, 4),        # 4x4 tiles cover 28x28 exactly
    ((8, 64, 14, 14), (64, 64, 3, 3), 1, {}, 2),        # 16x16 under 4x4, 14x14 under 2x2
    ((8, 64, 16, 16), (64, 64, 3, 3), 0, {}, 2),        # 14x14 output (pad 0)
    ((8, 64, 7, 7), (80, 64, 3, 3), 1, {}, 4),          # 8x8 under both
    ((8, 16, 6, 6), (16, 16, 3, 3), 1, {}, 2),
    ((8, 64, 6, 10), (64, 64, 3, 3), 1, {}, 2),         # 8x12 vs 6x10
    ((8, 128, 14, 14), (128, 128, 3, 3), 1, {}, 2),     # at winograd2_max_channels
    ((8, 128, 14, 14), (256, 128, 3, 3), 1, {}, 4),     # above it: GEMM-bound
    ((8, 256, 14, 14), (128, 256, 3, 3), 1, {}, 4),
    ((8, 256, 14, 14), (128, 256, 3, 3), 1, {"winograd2_max_channels": 256}, 2),
    ((8, 64, 14, 14), (64, 64, 3, 3), 1, {"winograd_tile": 4}, 4),
    ((8, 32, 28, 28), (32, 32, 3, 3), 1, {"winograd_tile": 2}, 2),
])
def test_auto_winograd_tile(x_shape, w_shape, pad, settings, tile):
    with config.using(**settings):
        plan = ops.conv_plan(x_shape, w_shape, 1, pad)
    assert plan.algorithm == f"winograd{tile}"


def test_plan_is_frozen_and_reads_well():
    with config.using(conv_threads=2, winograd_chunk_bytes=1):
        plan = ops.conv_plan((6, 32, 28, 28), (32, 32, 3, 3), 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.algorithm = "im2col"
    text = repr(plan)
    assert text.startswith("ConvPlan(winograd4: x (6, 32, 28, 28) float32, w (32, 32, 3, 3)")
    assert "stride 1, pad 1 -> 28x28" in text and "6 chunks of <= 1 on 2 threads" in text
    assert "stacked" in repr(ops.conv_plan((2, 8, 9, 9), (4, 8, 1, 1)))
    with config.using(use_numba=False):
        assert repr(ops.conv_plan((2, 8, 9, 9), (4, 8, 3, 3), (2, 1), (0, 1))) == (
            "ConvPlan(generic: x (2, 8, 9, 9) float32, w (4, 8, 3, 3), stride (2, 1), "
            "pad (0, 1) -> 4x9)")


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_float16_and_integers_are_refused_in_one_line(dtype):
    # NumPy has no float16 GEMM: refused rather than run with an unbounded error
    with pytest.raises(ValueError, match=rf"conv_plan: {np.dtype(dtype)} is not supported "
                                         r"\(float32 or float64\)"):
        ops.conv_plan((2, 8, 9, 9), (4, 8, 3, 3), 1, 1, dtype)
    x = np.ones((2, 8, 9, 9), dtype)
    match = (r"conv2d: float16 is not supported \(float32 or float64\); cast first"
             if dtype == np.float16 else r"conv2d: x must be a floating-point array")
    with pytest.raises(ValueError, match=match):
        ops.conv2d_forward(x, np.ones((4, 8, 3, 3), dtype), None, 1, 1)


@pytest.mark.parametrize("args,match", [
    (((2, 3, 5), (4, 3, 3, 3)), r"conv_plan: x must be 4-D"),
    (((2, 3, 5, 5), (4, 2, 3, 3)), r"conv_plan: channel mismatch"),
    (((2, 3, 2, 2), (4, 3, 3, 3)), r"conv_plan: kernel 3x3 is larger than the padded input"),
    (((2, 3, 5, 5), (4, 3, 3, 3), 0), r"conv_plan: stride must be >= 1"),
])
def test_conv_plan_errors_name_it(args, match):
    with pytest.raises(ValueError, match=match):
        ops.conv_plan(*args)


@pytest.mark.gpu
def test_gpu_backward_follows_the_forwards_plan():
    cp = backend.cupy
    rng = np.random.default_rng(5)
    x = cp.asarray(rng.standard_normal((2, 16, 6, 6)))
    w = cp.asarray(rng.standard_normal((16, 16, 3, 3)))
    dy = cp.asarray(rng.standard_normal((2, 16, 6, 6)))
    with config.using(use_cudnn=False):
        _, cache = ops.conv2d_forward(x, w, None, 1, 1)
    assert cache.plan.algorithm == "generic"
    dx, dw, _ = ops.conv2d_backward(dy, cache)
    x_ref, w_ref, dy_ref = (backend.to_numpy(a) for a in (x, w, dy))
    _, cache_ref = ops.conv2d_reference_forward(x_ref, w_ref, None, 1, 1)
    dx_ref, dw_ref, _ = ops.conv2d_reference_backward(dy_ref, cache_ref)
    np.testing.assert_allclose(backend.to_numpy(dx), dx_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(dw), dw_ref, rtol=1e-10, atol=1e-10)


def test_winograd_chunks_hold_enough_tiles_and_no_more():
    """winograd_chunk_tiles: chunks of about that many times max(C, C_out)
    tiles, under the winograd_chunk_bytes cap; 0 turns the rule off."""
    small = ((128, 32, 28, 28), (32, 32, 3, 3), 1, 1)        # 49 tiles per sample
    with config.using(conv_threads=1, winograd_chunk_tiles=0):
        assert ops.conv_plan(*small).n_chunks == 2            # 74 samples (225 KB) per 16 MB
    with config.using(conv_threads=1):                        # default 32 tiles per channel
        plan = ops.conv_plan(*small)
    assert plan.n_chunks == -(-128 // 21)                 # 21 samples hold 1029 >= 32*32 tiles
    with config.using(conv_threads=1, winograd_chunk_tiles=64):
        assert ops.conv_plan(*small).n_chunks == -(-128 // 42)    # 42 * 49 >= 64 * 32
    # wide layers stay at the byte cap: 32 * 256 tiles would be 75 MB
    wide = ((128, 256, 14, 14), (256, 256, 3, 3), 1, 1)
    with config.using(conv_threads=1):
        a = ops.conv_plan(*wide).n_chunks
    with config.using(conv_threads=1, winograd_chunk_tiles=0):
        assert ops.conv_plan(*wide).n_chunks == a

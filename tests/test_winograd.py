"""Winograd paths of conv2d, F(2x2, 3x3) and F(4x4, 3x3) (every test runs
for both): held to the direct reference convolution (float64, 1e-12), their
transforms to their definitions and their adjoints, their gradients to finite
differences, and their threaded pipeline to the plain one."""
import numpy as np
import pytest

from tinynorm import config
from tinynorm.gradcheck import gradcheck
from tinynorm.ops.conv import _winograd2 as wg2
from tinynorm.ops.conv import _winograd4 as wg4
from tinynorm.ops.conv import (conv2d_backward, conv2d_backward_data, conv2d_backward_filter,
                               conv2d_forward, conv2d_reference_backward,
                               conv2d_reference_forward, conv_plan)

# (N, C, H, W), C_out, pad, bias -- all 3x3 / stride 1 with >= 16 channels
CONFIGS = [
    ((2, 16, 6, 6), 16, 1, True),       # even output, whole tiles
    ((3, 17, 7, 5), 20, 1, False),      # odd output both ways
    ((2, 16, 7, 7), 18, 0, True),       # pad 0: 5x5 output
    ((1, 24, 5, 6), 16, 2, True),       # pad 2, batch 1
    ((2, 16, 3, 3), 16, 0, True),       # 1x1 output: one tile, three quarters dropped
    ((2, 16, 4, 9), 32, 1, False),
]


def _ids(configs):
    return [f"x{c[0]}-o{c[1]}-p{c[2]}-{'b' if c[3] else 'nob'}" for c in configs]


def _make(rng, shape, c_out, bias, dtype=np.float64):
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((c_out, shape[1], 3, 3)) / np.sqrt(9 * shape[1])).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    return x, w, b


MODULES = {2: wg2, 4: wg4}
# float32 error bound relative to the result's scale.  F(2x2, 3x3) adds and
# subtracts only, and stays within a few float32 ulps (eps 1.2e-7), as im2col
# does.  F(4x4, 3x3) multiplies by up to 5 in B^T, 8 in A^T and 1/24 in G, so
# the rounding of the stored transforms is amplified: about 1e-6 to 3e-6 at
# fan-in 16-24 (Lavin & Gray report F(4x4, 3x3) an order of magnitude less
# accurate than F(2x2, 3x3) in float32), bounded here by 1e-5.
F32_BOUND = {2: 2e-6, 4: 1e-5}


@pytest.fixture(params=[2, 4], ids=["F2", "F4"], autouse=True)
def tile(request):
    """Every test of this module runs once per Winograd variant (and on the
    hand-written plans: float32 would take oneDNN's by default)."""
    with config.using(winograd_tile=request.param, use_onednn=False):
        yield request.param


@pytest.fixture
def wg(tile):
    return MODULES[tile]


@pytest.fixture
def algorithm(tile):
    """The plan name of this variant."""
    return f"winograd{tile}"


@pytest.mark.parametrize("shape,c_out,pad,bias", CONFIGS, ids=_ids(CONFIGS))
def test_winograd_matches_direct_convolution(rng, algorithm, shape, c_out, pad, bias):
    x, w, b = _make(rng, shape, c_out, bias)
    y, cache = conv2d_forward(x, w, b, 1, pad)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, 1, pad)
    assert cache.plan.algorithm == algorithm
    assert y.shape == y_ref.shape and y.flags.c_contiguous
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = conv2d_reference_backward(dy, cache_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    assert dx.flags.c_contiguous and dw.flags.c_contiguous and dw.dtype == w.dtype
    if bias:
        np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)
    else:
        assert db is None
    np.testing.assert_array_equal(conv2d_backward_data(dy, cache), dx)
    dw_only, db_only = conv2d_backward_filter(dy, cache)
    np.testing.assert_array_equal(dw_only, dw)
    assert (db_only is None) == (not bias)


@pytest.mark.parametrize("shape,c_out,pad,bias", CONFIGS[:3], ids=_ids(CONFIGS[:3]))
def test_winograd_float32_within_its_error_bound(rng, tile, shape, c_out, pad, bias):
    x, w, b = _make(rng, shape, c_out, bias, np.float32)
    y, cache = conv2d_forward(x, w, b, 1, pad)
    f64 = [a.astype(np.float64) if a is not None else None for a in (x, w, b)]
    y_ref, cache_ref = conv2d_reference_forward(*f64, 1, pad)
    assert y.dtype == np.float32
    dy = rng.standard_normal(y.shape).astype(np.float32)
    got = (y,) + tuple(g for g in conv2d_backward(dy, cache) if g is not None)
    ref = (y_ref,) + tuple(g for g in conv2d_reference_backward(dy.astype(np.float64),
                                                               cache_ref) if g is not None)
    for a, r in zip(got, ref):
        assert a.dtype == np.float32
        assert np.abs(a - r).max() <= F32_BOUND[tile] * np.abs(r).max()


def test_winograd4_float32_bound_holds_at_a_wide_fan_in(rng, tile):
    """The F(4x4, 3x3) error bound at ResNet-like fan-in (128 channels)."""
    x, w, b = _make(rng, (2, 128, 8, 8), 64, True, np.float32)
    y, cache = conv2d_forward(x, w, b, 1, 1)
    y_ref, _ = conv2d_reference_forward(x.astype(np.float64), w.astype(np.float64),
                                        b.astype(np.float64), 1, 1)
    assert np.abs(y - y_ref).max() <= F32_BOUND[tile] * np.abs(y_ref).max()


def test_winograd_gradients_match_finite_differences(rng, algorithm):
    x, w, b = _make(rng, (2, 16, 5, 4), 16, True)
    assert conv_plan(x.shape, w.shape, 1, 1, x.dtype).algorithm == algorithm
    results = gradcheck(conv2d_forward, conv2d_backward, x, w, b, 1, 1,
                        names=("x", "w", "b", "stride", "pad"))
    assert [r.name for r in results] == ["x", "w", "b"]
    assert all(r.passed and r.max_rel_error <= 1e-6 for r in results)


def test_switch_and_thresholds_select_the_path(rng, algorithm):
    x, w, b = _make(rng, (2, 16, 6, 6), 16, True)
    with config.using(winograd=False):
        y_im2col, cache = conv2d_forward(x, w, b, 1, 1)
    assert cache.plan.algorithm == "im2col"
    y_wino, cache = conv2d_forward(x, w, b, 1, 1)
    assert cache.plan.algorithm == algorithm
    np.testing.assert_allclose(y_wino, y_im2col, rtol=1e-12, atol=1e-12)
    # not used: too few input channels, stride 2, 5x5 kernel, too few output channels
    assert conv_plan((2, 3, 6, 6), (16, 3, 3, 3), 1, 1).algorithm == "im2col"
    assert conv_plan(x.shape, w.shape, 2, 1).algorithm == "im2col"
    assert conv_plan(x.shape, (16, 16, 5, 5), 1, 2).algorithm == "im2col"
    assert conv_plan(x.shape, (15, 16, 3, 3), 1, 1).algorithm == "im2col"
    # the threshold is a setting
    with config.using(winograd_min_channels=3):
        assert conv_plan((2, 3, 6, 6), (16, 3, 3, 3), 1, 1).algorithm == algorithm
    with config.using(winograd_min_channels=17):
        assert conv_plan(x.shape, w.shape, 1, 1).algorithm == "im2col"


@pytest.mark.parametrize("parallel", [True, False])
def test_threaded_pipeline_and_kernels_agree(rng, parallel):
    """Many small chunks on two threads (the serial kernels), and the parallel
    kernels on the calling thread, against the im2col path."""
    x, w, b = _make(rng, (6, 16, 9, 8), 24, True)
    dy = rng.standard_normal((6, 24, 9, 8))
    with config.using(winograd=False):
        y0, c0 = conv2d_forward(x, w, b, 1, 1)
    g0 = conv2d_backward(dy, c0)
    # one sample per chunk on two pipeline threads, or the parallel kernels
    pipeline = dict(winograd_chunk_bytes=1, conv_threads=2) if not parallel else {}
    with config.using(parallel_kernels=parallel, parallel_min_work=0, **pipeline):
        y1, c1 = conv2d_forward(x, w, b, 1, 1)
    if not parallel:
        assert (c1.plan.threads, c1.plan.n_chunks) == (2, 6)
        assert [len(group) for group in c1.plan.chunk_groups()] == [3, 3]
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(conv2d_backward(dy, c1), g0):
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def _buffer(wg, rows, cols, dtype=np.float64):
    return wg.transform_buffer(np.full(wg.buffer_size(rows, cols, np.dtype(dtype).itemsize),
                                       np.nan, dtype=dtype), rows, cols)


def test_transform_matrices_compute_the_correlation(rng, wg):
    """A^T [(G g G^T) * (B^T d B)] A is the m x m cross-correlation of the patch."""
    m = wg.M
    d = rng.standard_normal((m + 2, m + 2))
    g = rng.standard_normal((3, 3))
    y = wg.AT @ ((wg.G @ g @ wg.G.T) * (wg.BT @ d @ wg.BT.T)) @ wg.AT.T
    ref = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("h,w", [(5, 7), (9, 10)])
def test_transforms_equal_their_matrix_definitions(rng, wg, h, w):
    n, c, w_, pad = 2, 3, w, (1, 1)
    m, s = wg.M, wg.SLICES
    x = rng.standard_normal((n, c, h, w_))
    oh, ow = h, w_
    th, tw = wg.tiles(oh, ow)
    v = wg.input_transform(x, pad, _buffer(wg, c, n * th * tw))
    xp = np.zeros((n, c, m * th + 2, m * tw + 2))
    xp[:, :, 1:1 + h, 1:1 + w_] = x
    for (nn, cc, ty, tx) in [(0, 0, 0, 0), (1, 2, th - 1, tw - 1), (0, 1, 1, tw - 1)]:
        d = xp[nn, cc, m * ty:m * ty + m + 2, m * tx:m * tx + m + 2]
        expect = (wg.BT @ d @ wg.BT.T).reshape(s)
        np.testing.assert_allclose(v[:, cc, (nn * th + ty) * tw + tx], expect, atol=1e-13)
    mm = rng.standard_normal((s, c, n * th * tw))
    mb = _buffer(wg, c, n * th * tw)
    mb[...] = mm
    y = wg.output_transform(mb, n, oh, ow, None, np.empty((n, c, oh, ow)))
    for (nn, cc, ty, tx) in [(0, 0, 0, 0), (1, 2, th - 1, tw - 1)]:
        tile = wg.AT @ mm[:, cc, (nn * th + ty) * tw + tx].reshape(m + 2, m + 2) @ wg.AT.T
        block = y[nn, cc, m * ty:m * ty + m, m * tx:m * tx + m]
        np.testing.assert_allclose(block, tile[:block.shape[0], :block.shape[1]], atol=1e-13)
    g = rng.standard_normal((4, c, 3, 3))
    u = wg.filter_transform(g)
    np.testing.assert_allclose(u[:, 1, 2].reshape(m + 2, m + 2), wg.G @ g[1, 2] @ wg.G.T,
                               atol=1e-14)


@pytest.mark.parametrize("h,w,pad", [(5, 7, 1), (6, 6, 0), (4, 5, 2), (11, 9, 1)])
def test_adjoint_transforms_are_transposes(rng, wg, h, w, pad):
    """<T x, z> == <x, T^T z> for the input, output and filter transforms."""
    n, c = 2, 3
    pad = (pad, pad)
    oh, ow = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    th, tw = wg.tiles(oh, ow)
    x = rng.standard_normal((n, c, h, w))
    z = _buffer(wg, c, n * th * tw)
    z[...] = rng.standard_normal(z.shape)
    tx_ = wg.input_transform(x, pad, _buffer(wg, c, n * th * tw))
    back = wg.input_transform_adjoint(z, x.shape, pad, np.empty_like(x))
    assert np.isclose(np.sum(tx_ * z), np.sum(x * back), rtol=1e-12)
    dy = rng.standard_normal((n, c, oh, ow))
    m = _buffer(wg, c, n * th * tw)
    m[...] = rng.standard_normal(m.shape)
    y = wg.output_transform(m, n, oh, ow, None, np.empty((n, c, oh, ow)))
    dm, sums = wg.output_transform_adjoint(dy, _buffer(wg, c, n * th * tw))
    assert np.isclose(np.sum(y * dy), np.sum(m * dm), rtol=1e-12)
    np.testing.assert_allclose(sums, dy.sum(axis=(0, 2, 3)), rtol=1e-12)
    g = rng.standard_normal((4, c, 3, 3))
    du = rng.standard_normal((wg.SLICES, 4, c))
    assert np.isclose(np.sum(wg.filter_transform(g) * du),
                      np.sum(g * wg.filter_transform_adjoint(du)), rtol=1e-12)


def test_k_slices_avoid_4k_aliasing(wg):
    for rows, cols, itemsize in [(128, 1568, 4), (16, 3, 8), (256, 784, 4)]:
        sk = wg.k_stride(rows, cols, itemsize)
        assert sk >= rows * cols
        assert (sk * itemsize) % 4096 == 256
    v = _buffer(wg, 5, 7, np.float32)
    assert v.shape == (wg.SLICES, 5, 7) and v[3].flags.c_contiguous


def test_bad_tile_setting_is_named():
    with pytest.raises(ValueError, match="winograd_tile must be 'auto', 2 or 4; got 3"):
        with config.using(winograd_tile=3):
            pass

"""conv2d and its geometry: gradients, fast paths against the slow reference,
dtypes, argument errors, workspaces, parallel kernels, GPU."""
import threading

import numpy as np
import pytest

from tinynorm import backend, config
from tinynorm.gradcheck import gradcheck
from tinynorm.ops import _geometry as geo
from tinynorm.ops import _kernels as kernels
from tinynorm.ops import conv as conv_mod
from tinynorm.ops.conv import (conv2d_backward, conv2d_backward_data, conv2d_backward_filter,
                               conv2d_forward, conv2d_reference_backward,
                               conv2d_reference_forward)

# (N, C, H, W), C_out, (kh, kw), stride, pad, bias
GRAD_CONFIGS = [
    ((2, 3, 5, 6), 4, (3, 3), 1, 1, True),
    ((1, 2, 7, 5), 3, (3, 3), 2, 0, True),
    ((2, 2, 6, 7), 3, (3, 3), 2, 2, False),
    ((1, 2, 6, 7), 2, (5, 5), 1, 2, True),
    ((2, 1, 9, 8), 2, (5, 5), 2, 1, True),
    ((2, 3, 4, 5), 2, (1, 1), 1, 0, True),
    ((1, 3, 5, 4), 2, (1, 1), 2, 1, False),
    ((2, 2, 5, 7), 3, (2, 3), (2, 1), (1, 2), True),
    ((1, 1, 3, 3), 2, (3, 3), 1, 0, True),          # output 1x1
    ((1, 2, 4, 6), 2, (4, 6), 1, 0, True),          # kernel = whole input
]


def _ids(configs):
    return [f"x{c[0]}-k{c[2]}-s{c[3]}-p{c[4]}-{'b' if c[5] else 'nob'}" for c in configs]


def _make(rng, shape, c_out, kernel, bias, dtype=np.float64):
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((c_out, shape[1], *kernel))
         / np.sqrt(shape[1] * kernel[0] * kernel[1])).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", GRAD_CONFIGS,
                         ids=_ids(GRAD_CONFIGS))
def test_conv2d_gradients_match_finite_differences(rng, shape, c_out, kernel, stride, pad,
                                                   bias):
    x, w, b = _make(rng, shape, c_out, kernel, bias)
    results = gradcheck(conv2d_forward, conv2d_backward, x, w, b, stride, pad,
                        names=("x", "w", "b", "stride", "pad"))
    assert [r.name for r in results] == (["x", "w", "b"] if bias else ["x", "w"])
    assert all(r.passed and r.max_rel_error <= 1e-6 for r in results)


def test_conv2d_gradients_directional_on_a_larger_case(rng):
    # x has 2*4*9*10 = 720 > 256 elements: checked along random directions
    x, w, b = _make(rng, (2, 4, 9, 10), 5, (3, 3), True)
    results = gradcheck(conv2d_forward, conv2d_backward, x, w, b, 2, 1,
                        names=("x", "w", "b", "stride", "pad"))
    assert {r.name: r.mode for r in results}["x"] == "directional"
    assert all(r.passed for r in results)


# Shapes for fast-vs-reference; includes both 1x1 CPU variants: stacked matmul
# (small channel counts or P >= 64) and transposes + one GEMM (both channel
# counts > 32 and P < 64), batch 1, and odd sizes.
REF_CONFIGS = GRAD_CONFIGS + [
    ((3, 5, 11, 9), 7, (3, 3), 1, 1, True),
    ((1, 6, 13, 10), 4, (3, 3), 2, 1, True),
    ((4, 40, 3, 5), 36, (1, 1), 1, 0, True),        # 1x1, single-GEMM path
    ((1, 40, 3, 5), 36, (1, 1), 1, 0, False),       # same, batch 1
    ((3, 4, 9, 9), 40, (1, 1), 1, 0, True),         # 1x1, stacked path (P = 81)
    ((2, 3, 8, 8), 5, (3, 3), (1, 3), (0, 2), True),
]


@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", REF_CONFIGS,
                         ids=_ids(REF_CONFIGS))
def test_fast_conv_matches_reference(rng, shape, c_out, kernel, stride, pad, bias):
    x, w, b = _make(rng, shape, c_out, kernel, bias)
    y, cache = conv2d_forward(x, w, b, stride, pad)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, stride, pad)
    assert y.shape == y_ref.shape and y.dtype == np.float64 and y.flags.c_contiguous
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = conv2d_reference_backward(dy, cache_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    assert dx.flags.c_contiguous and dx.shape == x.shape and dw.shape == w.shape
    if bias:
        np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)
    else:
        assert db is None
    # the split backward functions agree with the combined one
    np.testing.assert_array_equal(conv2d_backward_data(dy, cache), dx)
    dw_only, db_only = conv2d_backward_filter(dy, cache)
    np.testing.assert_array_equal(dw_only, dw)
    assert (db_only is None) == (not bias)


@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", REF_CONFIGS[:8],
                         ids=_ids(REF_CONFIGS[:8]))
def test_generic_path_matches_reference(rng, shape, c_out, kernel, stride, pad, bias):
    """The array-generic plan (the GPU fallback without cuDNN, and every CPU
    conv with numba kernels off), run on NumPy."""
    x, w, b = _make(rng, shape, c_out, kernel, bias)
    with config.using(use_numba=False):
        y, cache = conv2d_forward(x, w, b, stride, pad)
    assert cache.plan.algorithm == "generic"
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, stride, pad)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, g_ref in zip(conv2d_backward(dy, cache), conv2d_reference_backward(dy, cache_ref)):
        if g_ref is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_reference_is_a_direct_convolution():
    # one output pixel by hand: y[0, 0, 1, 0] with stride 2, pad 1
    rng = np.random.default_rng(5)
    x, w, b = _make(rng, (1, 2, 5, 4), 3, (3, 3), True)
    y, _ = conv2d_reference_forward(x, w, b, 2, 1)
    x_pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    by_hand = b[0] + np.sum(w[0] * x_pad[0, :, 2:5, 0:3])
    assert y[0, 0, 1, 0] == pytest.approx(by_hand, rel=1e-13)
    assert y.shape == (1, 3, 3, 2)


@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", REF_CONFIGS[10:],
                         ids=_ids(REF_CONFIGS[10:]))
def test_float32_agrees_with_float64(rng, shape, c_out, kernel, stride, pad, bias):
    x, w, b = _make(rng, shape, c_out, kernel, bias)
    y64, cache64 = conv2d_forward(x, w, b, stride, pad)
    f32 = [a.astype(np.float32) if a is not None else None for a in (x, w, b)]
    y32, cache32 = conv2d_forward(*f32, stride, pad)
    assert y32.dtype == np.float32
    scale = np.abs(y64).max()
    np.testing.assert_allclose(y32, y64, rtol=0, atol=2e-6 * scale)
    dy = rng.standard_normal(y64.shape)
    for g32, g64 in zip(conv2d_backward(dy.astype(np.float32), cache32),
                        conv2d_backward(dy, cache64)):
        if g64 is None:
            assert g32 is None
            continue
        assert g32.dtype == np.float32
        np.testing.assert_allclose(g32, g64, rtol=0, atol=5e-6 * np.abs(g64).max())


def test_stride_and_pad_pairs_equal_ints(rng):
    x, w, b = _make(rng, (2, 3, 7, 7), 4, (3, 3), True)
    y_int, _ = conv2d_forward(x, w, b, 2, 1)
    y_pair, _ = conv2d_forward(x, w, b, (2, 2), [1, 1])
    np.testing.assert_array_equal(y_int, y_pair)


def test_non_contiguous_input(rng):
    x, w, b = _make(rng, (2, 3, 6, 5), 4, (3, 3), True)
    x_t = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not x_t.flags.c_contiguous
    y, cache = conv2d_forward(x_t, w, b, 1, 1)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, 1, 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dy_f = np.asfortranarray(dy)
    assert not dy_f.flags.c_contiguous
    for g, g_ref in zip(conv2d_backward(dy_f, cache), conv2d_reference_backward(dy, cache_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_results_do_not_alias_workspaces(rng):
    """Outputs survive later calls that reuse (and grow) the workspaces."""
    x1, w1, b1 = _make(rng, (3, 4, 8, 8), 5, (3, 3), True)
    y1, cache1 = conv2d_forward(x1, w1, b1, 1, 1)
    dx1, dw1, db1 = conv2d_backward(np.ones_like(y1), cache1)
    kept = [a.copy() for a in (y1, dx1, dw1, db1)]
    x2, w2, b2 = _make(rng, (4, 6, 12, 12), 7, (5, 5), True)   # larger col buffer
    y2, cache2 = conv2d_forward(x2, w2, b2, 1, 2)
    conv2d_backward(rng.standard_normal(y2.shape), cache2)
    for before, now in zip(kept, (y1, dx1, dw1, db1)):
        np.testing.assert_array_equal(before, now)
    # and a smaller call after the buffers grew is still right
    y3, _ = conv2d_forward(x1, w1, b1, 1, 1)
    np.testing.assert_array_equal(y3, y1)
    conv_mod.release_workspaces()
    np.testing.assert_array_equal(conv2d_forward(x1, w1, b1, 1, 1)[0], y1)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_and_serial_kernels_agree(rng, parallel):
    """Force both launch modes (the default on this machine may be either)."""
    x, w, b = _make(rng, (3, 5, 9, 7), 6, (3, 3), True)
    with config.using(parallel_kernels=parallel, parallel_min_work=0):
        y, cache = conv2d_forward(x, w, b, (2, 1), 1)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, (2, 1), 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, g_ref in zip(conv2d_backward(dy, cache), conv2d_reference_backward(dy, cache_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_blas_spin_detection(monkeypatch):
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.delenv("GOTO_THREAD_TIMEOUT", raising=False)
    assert kernels.blas_workers_spin()
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    assert not kernels.blas_workers_spin()
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "28")
    assert kernels.blas_workers_spin()


def test_concurrent_threads_get_their_own_workspaces():
    rng = np.random.default_rng(9)
    jobs = [_make(rng, (2, 3, 10, 9), 4, (3, 3), True), _make(rng, (3, 2, 7, 12), 5, (5, 5), True)]
    expected = [conv2d_reference_forward(x, w, b, 1, 2)[0] for x, w, b in jobs]
    errors = []

    def work(k):
        x, w, b = jobs[k]
        for _ in range(20):
            y, _ = conv2d_forward(x, w, b, 1, 2)
            if not np.allclose(y, expected[k], rtol=1e-12, atol=1e-12):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- geometry ---------------------------------------------------------------

GEOM_CONFIGS = [((2, 3, 7, 5), (3, 3), (1, 1), (1, 1)), ((1, 2, 6, 9), (3, 2), (2, 1), (2, 0)),
                ((3, 2, 5, 5), (5, 5), (2, 2), (2, 2)), ((2, 3, 4, 4), (1, 1), (1, 1), (0, 0)),
                ((2, 2, 3, 3), (4, 4), (3, 2), (1, 2)), ((1, 1, 8, 3), (2, 3), (3, 1), (0, 1))]


@pytest.mark.parametrize("shape,kernel,stride,pad", GEOM_CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_col2im_fast_equal_reference_and_adjoint(shape, kernel, stride, pad, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype)
    col = geo.im2col(x, kernel, stride, pad)
    np.testing.assert_array_equal(col, geo.im2col_reference(x, kernel, stride, pad))
    c = rng.standard_normal(col.shape).astype(dtype)
    back = geo.col2im(c, shape, kernel, stride, pad)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(back, geo.col2im_reference(c, shape, kernel, stride, pad),
                               rtol=tol, atol=tol)
    # col2im is the adjoint of im2col: <im2col(x), c> = <x, col2im(c)>
    lhs = float(np.sum(col.astype(np.float64) * c))
    rhs = float(np.sum(x.astype(np.float64) * back))
    assert lhs == pytest.approx(rhs, rel=10 * tol, abs=10 * tol)


def test_conv_outsize_and_pair():
    assert geo.conv_outsize(28, 3, 1, 1) == 28
    assert geo.conv_outsize(7, 3, 1, 0) == 5
    assert geo.conv_outsize(28, 3, 2, 1) == 14
    assert geo.pair(3, "k", "op", minimum=1) == (3, 3)
    assert geo.pair((2, 5), "k", "op", minimum=1) == (2, 5)
    with pytest.raises(ValueError, match="op: k must be an int or an \\(h, w\\) pair"):
        geo.pair((1, 2, 3), "k", "op", minimum=1)
    with pytest.raises(ValueError, match="op: k must be an int"):
        geo.pair(1.5, "k", "op", minimum=1)


# --- argument errors -------------------------------------------------------

def _ok():
    rng = np.random.default_rng(0)
    return _make(rng, (2, 3, 6, 6), 4, (3, 3), True)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, b: (x[0], w, b, 1, 0), r"x must be 4-D \(N, C, H, W\); got shape \(3, 6, 6\)"),
    (lambda x, w, b: (x, w[:, :, 0], b, 1, 0), r"w must be 4-D"),
    (lambda x, w, b: (x[:, :2], w, b, 1, 0), r"channel mismatch: x has C=2 .* C_in=3"),
    (lambda x, w, b: (x, w, b[:3], 1, 0),
     r"bias shape mismatch: b has shape \(3,\), expected \(4,\)"),
    (lambda x, w, b: (x[:, :, :2, :2], w, b, 1, 0),
     r"kernel 3x3 is larger than the padded input 2x2"),
    (lambda x, w, b: (x[:, :, :1], w, b, 1, 0), r"kernel 3x3 is larger than the padded input 1x6"),
    (lambda x, w, b: (x, w.astype(np.float32), b, 1, 0),
     r"dtype mismatch: x is float64 but w is float32"),
    (lambda x, w, b: (x.astype(np.int64), w, b, 1, 0), r"x must be a floating-point array"),
    (lambda x, w, b: (x, w, b, 0, 0), r"stride must be >= 1; got 0"),
    (lambda x, w, b: (x, w, b, 1, -1), r"pad must be >= 0; got -1"),
    (lambda x, w, b: (x, w, b, (1, 2, 3), 0), r"stride must be an int or an \(h, w\) pair"),
    (lambda x, w, b: (x.tolist(), w, b, 1, 0), r"x must be a NumPy or CuPy array"),
])
def test_conv2d_bad_input_raises_clear_error(mutate, match):
    with pytest.raises(ValueError, match="conv2d: " + match):
        conv2d_forward(*mutate(*_ok()))


def test_kernel_fits_once_padded():
    x, w, b = _ok()
    y, _ = conv2d_forward(x[:, :, :2, :2], w, b, 1, 1)   # 2x2 padded to 4x4 fits 3x3
    assert y.shape == (2, 4, 2, 2)


def test_backward_rejects_wrong_dy():
    x, w, b = _ok()
    y, cache = conv2d_forward(x, w, b, 1, 1)
    with pytest.raises(ValueError, match=r"conv2d_backward: dy has shape \(2, 4, 6, 5\), "
                                         r"expected \(2, 4, 6, 6\)"):
        conv2d_backward(y[..., :5], cache)
    with pytest.raises(ValueError, match="dtype mismatch: dy is float32"):
        conv2d_backward(y.astype(np.float32), cache)


def test_gradcheck_cases_of_the_module_pass():
    cases = conv_mod.gradcheck_cases()
    assert len(cases) >= 5
    for label, fwd, bwd, args, names in cases:
        assert all(r.passed for r in gradcheck(fwd, bwd, *args, names=names, op=label))


# --- GPU (skipped without one) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", REF_CONFIGS,
                         ids=_ids(REF_CONFIGS))
def test_gpu_conv_matches_cpu_reference(shape, c_out, kernel, stride, pad, bias):
    cp = backend.cupy
    rng = np.random.default_rng(3)
    x, w, b = _make(rng, shape, c_out, kernel, bias)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, stride, pad)
    dy = rng.standard_normal(y_ref.shape)
    grads_ref = conv2d_reference_backward(dy, cache_ref)
    y, cache = conv2d_forward(cp.asarray(x), cp.asarray(w),
                              None if b is None else cp.asarray(b), stride, pad)
    assert isinstance(y, cp.ndarray) and y.flags.c_contiguous
    np.testing.assert_allclose(cp.asnumpy(y), y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(conv2d_backward(cp.asarray(dy), cache), grads_ref):
        if g_ref is None:
            assert g is None
        else:
            np.testing.assert_allclose(cp.asnumpy(g), g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_gpu_generic_fallback_matches_reference():
    cp = backend.cupy
    rng = np.random.default_rng(4)
    x, w, b = _make(rng, (2, 3, 7, 6), 4, (3, 3), True)
    y_ref, cache_ref = conv2d_reference_forward(x, w, b, 2, 1)
    with config.using(use_cudnn=False):
        y, cache = conv2d_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 2, 1)
    assert cache.plan.algorithm == "generic"
    np.testing.assert_allclose(cp.asnumpy(y), y_ref, rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y_ref.shape)
    for g, g_ref in zip(conv2d_backward(cp.asarray(dy), cache),
                        conv2d_reference_backward(dy, cache_ref)):
        np.testing.assert_allclose(cp.asnumpy(g), g_ref, rtol=1e-10, atol=1e-10)

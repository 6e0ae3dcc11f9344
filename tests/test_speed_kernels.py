"""The speed paths of issue 7 against slow, obvious references (float64, tight)."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from tinynorm import backend, config, ops
from tinynorm.ops import _gemm


@pytest.fixture(autouse=True)
def _hand_written_plans():
    """These tests pin the hand-written CPU plans' rules; float32 would take
    oneDNN's plan by default (use_onednn) where its library loads."""
    with config.using(use_onednn=False):
        yield


def rel_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.fixture
def force_split(monkeypatch):
    """Split every product, on two BLAS threads; yields the list of the
    thread counts of the splits that ran (observed, not selected, by a spy)."""
    calls = []
    run_split = _gemm._run_split

    def spy(jobs, n_threads):
        calls.append(len(jobs))
        return run_split(jobs, n_threads)
    monkeypatch.setattr(_gemm, "_run_split", spy)
    with threadpool_limits(2, user_api="blas"), config.using(split_min_flops=0):
        yield calls


def _naive_matmul(a, b):
    # the definition, one output element's sum at a time along the columns
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (4, 1, 9), (1, 6, 2), (5, 8, 3)])
def test_matmul_split_2d(force_split, rng, m, k, n):
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out = np.full((m, n), np.nan)
    assert _gemm.matmul(a, b, out=out) is out
    assert rel_error(out, _naive_matmul(a, b)) < 1e-14
    assert force_split == ([2] if n >= 4 else [])   # split in two when wide enough
    # a transposed view as the left operand (the input gradient's w2.T)
    assert rel_error(_gemm.matmul(a.T.copy().T, b), _naive_matmul(a, b)) < 1e-14


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_matmul_split_stacked(force_split, rng, batch):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((batch, 3, 6))
    got = _gemm.matmul(a, b)
    want = np.stack([_naive_matmul(a, b[i]) for i in range(batch)])
    assert got.shape == (batch, 4, 6)
    assert rel_error(got, want) < 1e-14


@pytest.mark.parametrize("length", [1, 2, 7, 40])
def test_matmul_nt_sum(force_split, rng, length):
    a, b = rng.standard_normal((3, length)), rng.standard_normal((5, length))
    got = _gemm.matmul_nt_sum(a, b)
    assert got.shape == (3, 5) and got.flags.c_contiguous
    assert rel_error(got, _naive_matmul(a, b.T)) < 1e-13
    assert force_split == ([2] if length >= 4 else [])


def test_split_restores_blas_threads(force_split, rng):
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 64))
    _gemm.matmul(a, b)
    _gemm.matmul_nt_sum(a, rng.standard_normal((5, 8)))
    assert _gemm.blas_threads() == 2


def test_no_split_for_other_arrays():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(_gemm.matmul(a, b), a @ b)


@pytest.mark.parametrize("shape,c_out,kernel,stride,pad", [
    ((3, 4, 7, 6), 5, 3, 1, 1),
    ((2, 3, 8, 8), 4, 3, 2, 0),
    ((4, 6, 5, 5), 7, 1, 1, 0),     # 1x1: the stacked path
    ((1, 5, 4, 4), 3, 1, 1, 0),     # 1x1, N == 1
    ((2, 3, 6, 5), 2, (2, 3), 1, (1, 0)),
])
def test_conv_with_split_gemms_matches_reference(force_split, rng, shape, c_out, kernel,
                                                 stride, pad):
    kh, kw = (kernel, kernel) if np.isscalar(kernel) else kernel
    x = rng.standard_normal(shape)
    w = rng.standard_normal((c_out, shape[1], kh, kw))
    b = rng.standard_normal(c_out)
    dy_shape = ops.conv2d_forward(x, w, b, stride, pad)[0].shape
    dy = rng.standard_normal(dy_shape)
    y, cache = ops.conv2d_forward(x, w, b, stride, pad)
    y_ref, cache_ref = ops.conv2d_reference_forward(x, w, b, stride, pad)
    assert rel_error(y, y_ref) < 1e-13
    for got, want in zip(ops.conv2d_backward(dy, cache),
                         ops.conv2d_reference_backward(dy, cache_ref)):
        assert rel_error(got, want) < 1e-13
    assert force_split                  # the GEMMs went through the split


def test_tune_allocator_is_idempotent():
    first = backend.tune_allocator()
    assert backend.tune_allocator() is first
    assert isinstance(first, bool)


@pytest.mark.parametrize("chunk_bytes", [1, 700, 1 << 30])
@pytest.mark.parametrize("shape,c_out,kernel,stride,pad,bias", [
    ((5, 3, 6, 5), 4, 3, 1, 1, True),
    ((4, 2, 7, 7), 3, 3, 2, 0, False),
    ((3, 40, 2, 2), 40, 1, 1, 0, True),     # 1x1, single-GEMM (not stacked) path
    ((3, 4, 9, 9), 5, 1, 1, 0, False),      # 1x1, stacked path
])
@pytest.mark.parametrize("pipeline", [False, True])
def test_conv_batch_chunks_match_reference(rng, chunk_bytes, shape, c_out, kernel, stride,
                                           pad, bias, pipeline):
    """Chunks of 1 sample, of a few samples (uneven), and the whole batch; on
    the calling thread, and (pipeline) on two threads with the serial kernels."""
    settings = dict(conv_chunk_bytes=chunk_bytes)
    if pipeline:
        settings.update(conv_split_min_flops=0, split_min_flops=0)
        stack = threadpool_limits(2, user_api="blas")
    else:
        stack = threadpool_limits(None)
    with stack, config.using(**settings):
        plan = _check_conv_against_reference(rng, shape, c_out, kernel, stride, pad, bias)
    if pipeline:
        assert plan.threads == 2
    if chunk_bytes == 1:                    # every sample its own chunk
        assert plan.n_chunks == shape[0]


def _check_conv_against_reference(rng, shape, c_out, kernel, stride, pad, bias):
    x = rng.standard_normal(shape)
    w = rng.standard_normal((c_out, shape[1], kernel, kernel))
    b = rng.standard_normal(c_out) if bias else None
    y, cache = ops.conv2d_forward(x, w, b, stride, pad)
    y_ref, cache_ref = ops.conv2d_reference_forward(x, w, b, stride, pad)
    assert rel_error(y, y_ref) < 1e-13
    dy = rng.standard_normal(y.shape)
    want = ops.conv2d_reference_backward(dy, cache_ref)
    got = ops.conv2d_backward(dy, cache)
    assert rel_error(got[0], want[0]) < 1e-13 and rel_error(got[1], want[1]) < 1e-13
    assert (got[2] is None) == (b is None)
    if bias:
        assert rel_error(got[2], want[2]) < 1e-13
    assert rel_error(ops.conv2d_backward_data(dy, cache), want[0]) < 1e-13
    dw, db = ops.conv2d_backward_filter(dy, cache)
    assert rel_error(dw, want[1]) < 1e-13
    return cache.plan


def test_pipeline_threads_follow_conv_split_min_flops():
    """By default (conv_threads None) a convolution's batch pipeline takes
    OpenBLAS's threads from conv_split_min_flops multiply-adds up, and the
    calling thread below; split_min_flops (the GEMM splits') does not move it."""
    x_shape, w_shape = (32, 8, 28, 28), (8, 8, 3, 3)        # the smoke preset's conv2
    macs = 32 * 28 * 28 * 8 * 8 * 9                         # 14.4 M
    with threadpool_limits(2, user_api="blas"):
        for limit, want in ((macs, 2), (macs + 1, 1)):
            with config.using(conv_split_min_flops=limit, split_min_flops=1 << 40):
                assert ops.conv_plan(x_shape, w_shape, 1, 1, np.float32).threads == want
        with config.using(conv_split_min_flops=0, conv_threads=1):
            assert ops.conv_plan(x_shape, w_shape, 1, 1, np.float32).threads == 1
    with threadpool_limits(1, user_api="blas"), config.using(conv_split_min_flops=0):
        assert ops.conv_plan(x_shape, w_shape, 1, 1, np.float32).threads == 1


@pytest.mark.parametrize("n,cap_samples,threads", [(128, 10, 1), (128, 10, 2), (7, 100, 2),
                                                   (5, 0, 2), (1, 3, 1), (3, 100, 2)])
def test_batch_chunks_cover_the_batch(n, cap_samples, threads):
    """The plan's chunks: consecutive, covering the batch, sizes within 1 of
    each other, under the byte cap when a sample fits in it, a multiple of
    the thread count when the batch allows, grouped contiguously per thread."""
    x_shape, w_shape = (n, 8, 6, 6), (4, 8, 3, 3)          # im2col, stride 2 -> 3x3
    per_sample = 8 * 9 * 3 * 3 * 8                          # K rows of OH*OW float64
    cap = max(1, cap_samples * per_sample)
    with config.using(conv_chunk_bytes=cap, conv_threads=threads):
        plan = ops.conv_plan(x_shape, w_shape, 2, 1, np.float64)
    assert plan.algorithm == "im2col"
    chunks = plan.chunks()
    assert len(chunks) == plan.n_chunks
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    sizes = [e - s for s, e in chunks]
    assert max(sizes) - min(sizes) <= 1
    if cap_samples >= 1:
        assert max(sizes) * per_sample <= cap
    else:
        assert max(sizes) == 1                  # a sample over the cap: one per chunk
    if n >= threads:
        assert plan.threads == threads
        assert plan.n_chunks % threads == 0 or plan.n_chunks == n
    groups = plan.chunk_groups()
    assert len(groups) == plan.threads and sum(groups, []) == chunks


def test_small_products_on_one_blas_thread(monkeypatch, rng):
    seen = []
    real = np.matmul

    def spy(*args, **kw):
        seen.append(_gemm.blas_threads())
        return real(*args, **kw)
    with threadpool_limits(2, user_api="blas"):
        monkeypatch.setattr(_gemm.np, "matmul", spy)
        a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
        assert rel_error(_gemm.matmul(a, b), _naive_matmul(a, b)) < 1e-14
        assert rel_error(_gemm.matmul_nt_sum(a, b.T.copy()), _naive_matmul(a, b)) < 1e-14
        monkeypatch.undo()
        assert seen == [1, 1] and _gemm.blas_threads() == 2


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_sets_passive_openmp_waiting_unless_the_user_chose(preset, expected):
    """``import tinynorm`` makes idle OpenMP workers sleep (numba's threading
    layer; see tinynorm/__init__.py), but never overrides the user's setting."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c",
                          "import os, tinynorm; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_serial_twins_do_not_share_their_kernels_cache(tmp_path):
    """In a fresh numba cache, compiling a parallel kernel must not give its
    serial twin a cache hit (a hit would mean the twin runs the kernel's
    parallel code, or the kernel the twin's serial code, whichever came first)."""
    import os
    import subprocess
    import sys
    code = """
import numpy as np
from tinynorm.ops import _geometry as geo
x = np.zeros((2, 3, 5, 5), np.float32)
col = np.empty(3 * 9 * 2 * 25, np.float32)
args = (x.reshape(-1), 2, 3, 5, 5, 3, 3, 1, 1, 1, 1, 5, 5, col)
geo._im2col_kernel(*args)
geo._im2col_serial(*args)
print(sum(geo._im2col_kernel.stats.cache_hits.values()),
      sum(geo._im2col_serial.stats.cache_hits.values()))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=300, check=True).stdout.split()
    assert run() == ["0", "0"]          # fresh cache: each compiled on its own
    assert run() == ["1", "1"]          # and each found its own entry next time


def test_every_serial_twin_is_compiled_from_its_own_function():
    from tinynorm.ops import _geometry
    from tinynorm.ops.conv import _winograd2, _winograd4, pipeline
    twins = [getattr(m, name) for m in (_geometry, _winograd2, _winograd4, pipeline)
             for name in dir(m) if name.endswith("_serial")]
    assert len(twins) == 12
    for twin in twins:
        assert twin.py_func.__qualname__.endswith("_kernel_serial")


class _Lib:
    def __init__(self, filepath):
        self.filepath = filepath


@pytest.mark.parametrize("order", [0, 1])
def test_numpy_first_picks_numpys_openblas_whatever_the_order(order):
    """SciPy's wheels bring a second OpenBLAS (loaded by numba's import), and
    threadpoolctl lists the two in an order that changes with the process's
    hash seed; the one under NumPy's installation must come first."""
    numpy_dir = "/env/site-packages/numpy"
    libs = [_Lib("/env/site-packages/scipy.libs/libscipy_openblas-1.so"),
            _Lib("/env/site-packages/numpy.libs/libscipy_openblas64_-2.so")]
    libs = libs[order:] + libs[:order]
    first = _gemm.numpy_first(libs, numpy_dir)[0]
    assert first.filepath.startswith("/env/site-packages/numpy.libs/")
    # inside the package directory itself (macOS wheels: numpy/.dylibs)
    libs = [_Lib("/usr/lib/libopenblas.so"), _Lib(numpy_dir + "/.dylibs/libopenblas.dylib")]
    assert _gemm.numpy_first(libs, numpy_dir)[0] is libs[1]
    # nothing under NumPy (a system BLAS): the order is kept
    libs = [_Lib("/usr/lib/a.so"), _Lib("/usr/lib/b.so")]
    assert _gemm.numpy_first(libs, numpy_dir) == libs
    # a sibling whose name merely starts like numpy's is not NumPy's
    libs = [_Lib("/env/site-packages/numpy_extra/libopenblas.so"), _Lib(numpy_dir + ".libs/x.so")]
    assert _gemm.numpy_first(libs, numpy_dir)[0] is libs[1]


def test_split_jobs_see_every_openblas_at_one_thread(monkeypatch, rng):
    """Inside a split, every OpenBLAS of the process -- SciPy's too, when it is
    loaded -- runs one thread: the two jobs are the parallelism, and a second
    BLAS thread under each would oversubscribe the cores (3-5x slower steps in
    the processes where NumPy's OpenBLAS was not the one set)."""
    pytest.importorskip("scipy.linalg")          # loads SciPy's OpenBLAS, when it has one
    from threadpoolctl import ThreadpoolController
    monkeypatch.setitem(_gemm._state, "libs", None)   # re-read the libraries loaded now
    seen = []

    def job():
        seen.append(sorted(lib.get_num_threads()
                           for lib in ThreadpoolController().select(
                               internal_api="openblas").lib_controllers))
    with threadpool_limits(2, user_api="blas"):
        _gemm.run_threads([job, job])
        after = [lib.get_num_threads() for lib in
                 ThreadpoolController().select(internal_api="openblas").lib_controllers]
    assert seen and all(counts and set(counts) == {1} for counts in seen)
    assert set(after) == {2}                     # and every one restored

"""Tests that need a GPU (CuPy with a usable CUDA device).

Every test here is marked ``gpu``: skipped where no GPU is usable, and FAILING
there under ``TINYNORM_REQUIRE_GPU=1`` (tests/conftest.py).  Under
``TINYNORM_REQUIRE_CUDNN=1`` the convolution-path test fails where the cuDNN
frontend is unusable instead of accepting the generic fallback.  NONE OF THEM HAS
RUN YET: they are written for the validation run of experiments/gpu_check.sh,
which sets both.

* every op's forward and backward on the device, float64 and float32, against
  the CPU float64 result; gradcheck on the device in float64;
* which convolution path ran (cuDNN frontend or generic) and why, and that a
  float32 cuDNN convolution does not round to TF32 unless allow_tf32 is on;
* a two-step training run of every model with every norm, GPU against CPU;
* the trainer on the GPU: batches staged ahead, checkpoint and resume there.
"""
import os

import numpy as np
import pytest

from tinynorm import backend, config, nn, ops
from tinynorm.backend import is_array, to_numpy
from tinynorm.gradcheck import gradcheck
from tinynorm.models import build_model
from tinynorm.selfcheck import all_cases
from tinynorm.train import Trainer, _Data, make_config

from model_steps import CASE_IDS, MODEL_CASES, sgd_steps

pytestmark = pytest.mark.gpu

# Errors are relative to the largest |reference| entry (rel_error).  float64 on the
# GPU differs from the CPU only in summation order: 1e-8, as the CPU's generic-vs-fast
# test.  float32 is held to the CPU's own float32 accuracy: at most 10x the error the
# CPU float32 run makes against the same float64 reference, and never required below
# 1e-4 (TF32, with 11 significant bits, would be ~1e-3 off on the convolutions).
TOL = {np.float64: 1e-8, np.float32: 1e-4}
CPU_FLOAT32_FACTOR = 10.0


def cp():
    return backend.cupy


def rel_error(got, ref):
    got, ref = np.asarray(to_numpy(got), np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def test_cupy_is_usable():
    assert backend.gpu_available()
    x = backend.to_device(np.arange(6.0), "gpu")
    assert backend.device_of(x) == "gpu" and float(x.sum()) == 15.0
    np.testing.assert_array_equal(backend.to_numpy(x), np.arange(6.0))


# -- every op --------------------------------------------------------------------------

# dropout draws its mask from the generator it is given (NumPy's in the gradcheck
# cases): tested on its own below with CuPy's.  The "fused kernel" cases call the
# numba batch norm directly, which takes NumPy arrays only.
CASES = [c for c in all_cases() if not c[0].startswith("dropout")
         and "fused kernel" not in c[0]]


def _to(args, dtype, device="gpu"):
    """Float arrays to ``device`` in ``dtype``; integer arrays there as they are."""
    out = []
    for a in args:
        if is_array(a):
            a = backend.to_device(a.astype(dtype) if a.dtype.kind == "f" else a, device)
        out.append(a)
    return out


def _allowed(dtype, cpu_float32_error):
    if dtype == np.float64:
        return TOL[np.float64]
    return max(TOL[np.float32], CPU_FLOAT32_FACTOR * cpu_float32_error)


def _fwd_bwd(forward, backward, args, dy_seed=7):
    y, cache = forward(*args)
    xp = backend.get_array_module(y) if is_array(y) else np
    shape = getattr(y, "shape", ())
    dy = np.random.default_rng(dy_seed).standard_normal(shape) if shape else 1.0
    if shape:
        dy = xp.asarray(dy.astype(y.dtype))
    return y, backward(dy, cache)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_op_on_the_gpu_matches_the_cpu_float64(case, dtype):
    label, forward, backward, args, _ = case
    y_ref, g_ref = _fwd_bwd(forward, backward, args)
    y, g = _fwd_bwd(forward, backward, _to(args, dtype))
    y32, g32 = _fwd_bwd(forward, backward, _to(args, np.float32, "cpu"))
    if is_array(y) and y.ndim:
        assert backend.device_of(y) == "gpu" and y.dtype == dtype, label
    assert rel_error(y, y_ref) <= _allowed(dtype, rel_error(y32, y_ref)), f"{label} forward"
    for i, (a, b, c) in enumerate(zip(g, g_ref, g32)):
        if b is None:
            assert a is None
            continue
        assert backend.device_of(a) == "gpu", f"{label} gradient {i} left the device"
        assert rel_error(a, b) <= _allowed(dtype, rel_error(c, b)), f"{label} gradient {i}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_on_the_gpu(case):
    label, forward, backward, args, names = case
    results = gradcheck(forward, backward, *_to(args, np.float64), names=names, op=label)
    assert results and all(r.passed for r in results)


def test_dropout_on_the_gpu_uses_a_device_generator():
    x = cp().asarray(np.random.default_rng(0).standard_normal((64, 32)))
    y, mask = ops.dropout_forward(x, 0.25, backend.default_rng(3, "gpu"), True)
    assert isinstance(mask, cp().ndarray)
    kept = to_numpy(mask) != 0
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_allclose(to_numpy(y), to_numpy(x) * to_numpy(mask), rtol=1e-15)
    (dx,) = ops.dropout_backward(cp().ones_like(x), mask)
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(mask))
    layer = nn.Dropout(0.5, seed=1).to("gpu")
    assert backend.device_of(layer(x)) == "gpu"
    with pytest.raises(ValueError, match="Dropout: the input is on the cpu"):
        layer(np.ones((2, 2)))


# -- which convolution path ---------------------------------------------------------------

def require_cudnn(ok, reason):
    """Fail when the cudnn plan is unavailable (``cudnn.status()`` is ``(ok,
    reason)``) and TINYNORM_REQUIRE_CUDNN is set: on a machine meant to run cuDNN,
    the generic fallback would pass every test with ops/conv/cudnn.py never run."""
    if not ok and os.environ.get("TINYNORM_REQUIRE_CUDNN", "") not in ("", "0"):
        pytest.fail(f"TINYNORM_REQUIRE_CUDNN=1 but the cudnn plan is unavailable: {reason}",
                    pytrace=False)


def test_the_conv_path_is_the_one_status_promises():
    from tinynorm.ops.conv import cudnn
    ok, reason = cudnn.status()
    print(f"cuDNN frontend: {'available, cuDNN ' + cudnn.version() if ok else reason}")
    require_cudnn(ok, reason)
    x = cp().asarray(np.random.default_rng(1).standard_normal((4, 16, 12, 12)), np.float32)
    w = cp().asarray(np.random.default_rng(2).standard_normal((32, 16, 3, 3)), np.float32)
    _, cache = ops.conv2d_forward(x, w, None, 1, 1)
    if ok:
        assert cache.plan.algorithm == "cudnn", cache.plan.reason
    else:
        assert cache.plan.algorithm == "generic" and cache.plan.fallback
        assert cache.plan.reason == reason
    with config.using(use_cudnn=False):
        _, cache = ops.conv2d_forward(x, w, None, 1, 1)
    assert cache.plan.algorithm == "generic" and not cache.plan.fallback
    with config.using(force_generic=True):
        assert ops.conv2d_forward(x, w, None, 1, 1)[1].plan.algorithm == "generic"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_every_conv_plan_path_matches_the_reference(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 64, 14, 14))
    w = rng.standard_normal((64, 64, 3, 3)) / 24.0
    b = rng.standard_normal(64)
    y_ref, cache_ref = ops.conv2d_reference_forward(x, w, b, 1, 1)
    dy = rng.standard_normal(y_ref.shape)
    grads_ref = ops.conv2d_reference_backward(dy, cache_ref)
    for settings in (dict(), dict(use_cudnn=False)):
        with config.using(**settings):
            y, cache = ops.conv2d_forward(*_to((x, w, b), dtype), 1, 1)
            grads = ops.conv2d_backward(cp().asarray(dy.astype(dtype)), cache)
        where = f"{cache.plan.algorithm} {np.dtype(dtype).name}"
        # the default allow_tf32=False: float32 keeps float32 precision (TF32: ~1e-3;
        # this well-conditioned conv in float32: ~1e-6)
        assert rel_error(y, y_ref) < TOL[dtype], where
        for g, g_ref in zip(grads, grads_ref):
            assert rel_error(g, g_ref) < TOL[dtype], where


# -- training: GPU against CPU ------------------------------------------------------------

MODEL_KW = {
    "cifar10_nv": dict(in_channels=3, width=1 / 8, input=(3, 28, 28)),
    "resnet50": dict(in_channels=3, width=1 / 16, stem="cifar", input=(3, 32, 32)),
    "deep_linear": dict(in_channels=1, depth=10, linear_width=16, in_features=64,
                        input=(1, 8, 8)),
}


def _two_steps(model_name, norm, device, dtype):
    losses, model, opt = sgd_steps(model_name, norm, MODEL_KW[model_name], batch=8,
                                   dtype=dtype, device=device)
    assert all(backend.device_of(v) == device for v in opt.velocity.values())
    return losses, {k: to_numpy(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("model_name,norm", MODEL_CASES, ids=CASE_IDS)
def test_two_training_steps_on_the_gpu_match_the_cpu(model_name, norm, dtype):
    ref_losses, ref_state = _two_steps(model_name, norm, "cpu", np.float64)
    losses, state = _two_steps(model_name, norm, "gpu", dtype)
    assert state.keys() == ref_state.keys()
    if dtype == np.float64:
        # atol: BN betas whose gradient is rounding noise (~1e-19) stay near 0
        np.testing.assert_allclose(losses, ref_losses, rtol=TOL[dtype])
        for name in state:
            np.testing.assert_allclose(state[name], ref_state[name], rtol=TOL[dtype],
                                       atol=1e-10, err_msg=name)
        return
    # float32 through two updates: no worse than the CPU's own float32 run
    cpu_losses, cpu_state = _two_steps(model_name, norm, "cpu", np.float32)
    assert rel_error(losses, ref_losses) <= _allowed(dtype, rel_error(cpu_losses, ref_losses))
    for name in state:
        allowed = _allowed(dtype, rel_error(cpu_state[name], ref_state[name]))
        assert rel_error(state[name], ref_state[name]) <= allowed, name


# -- the trainer on the GPU ---------------------------------------------------------------

TRAIN = dict(model="cifar10_nv", norm="bn", width=1 / 16, batch_size=32, epochs=2, lr=0.05,
             progress=False, seed=1, eval_batch_size=64)


def _trainer(cfg, ds, **kw):
    return Trainer(cfg, data=_Data(make_config(cfg), dataset=ds), **kw)


def test_trainer_on_the_gpu_checkpoints_and_resumes_there(tmp_path, synthetic_dataset):
    ds = synthetic_dataset()
    cfg = dict(TRAIN, device="gpu")
    full = _trainer(dict(cfg, out=str(tmp_path / "full")), ds)
    assert full.run(resume=False) == "completed"
    assert full.model.device == "gpu"
    assert all(backend.device_of(v) == "gpu" for v in full.opt.velocity.values())
    n = 2 * full.data.batches_per_epoch
    assert len(full.log["iter"]["loss"]) == n and np.isfinite(full.log["epoch"]["test_loss"][-1])

    part = _trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=5), ds)
    assert part.run(resume=False) == "completed"
    resumed = _trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=None), ds, resume=True)
    resumed.load_checkpoint()
    assert resumed.model.device == "gpu" and resumed.opt.iteration == 5
    assert all(backend.device_of(v) == "gpu" for v in resumed.opt.velocity.values())
    resumed = _trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=None), ds, resume=True)
    assert resumed.run() == "completed"
    # cuDNN may pick non-deterministic (atomic-add) algorithms: equal up to rounding
    np.testing.assert_allclose(resumed.log["iter"]["loss"], full.log["iter"]["loss"],
                               rtol=1e-4)

    cpu = _trainer(dict(TRAIN, device="cpu", out=str(tmp_path / "cpu")), ds)
    assert cpu.run(resume=False) == "completed"
    np.testing.assert_allclose(full.log["iter"]["loss"][:4], cpu.log["iter"]["loss"][:4],
                               rtol=1e-3)
    # a GPU checkpoint evaluated on the CPU (device may change: runconfig ALLOWED)
    on_cpu = _trainer(dict(cfg, out=str(tmp_path / "full"), device="cpu"), ds, resume=True)
    on_cpu.load_checkpoint()
    assert on_cpu.model.device == "cpu"
    for name, p in full.model.state_dict().items():
        np.testing.assert_array_equal(to_numpy(p), on_cpu.model.state_dict()[name])


def test_host_to_device_staging_is_ordered_and_complete():
    stager = backend.HostToDevice("gpu", slots=2)
    batches = [(np.full((64, 3, 8, 8), i, np.float32), np.arange(64) + i) for i in range(6)]
    pending = [stager.stage(b) for b in batches[:2]]
    got = []
    for b in batches[2:] + [None, None]:
        x, y = pending.pop(0).get()
        got.append((float(x.mean()), int(y[0])))
        if b is not None:
            pending.append(stager.stage(b))
    assert got == [(float(i), i) for i in range(6)]


def test_profile_on_the_gpu_times_every_category():
    from tinynorm.profile import profile_step
    model = build_model("cifar10_nv", "bn", in_channels=3, num_classes=10, width=1 / 8).to("gpu")
    x = backend.to_device(np.random.default_rng(0).standard_normal((32, 3, 28, 28))
                          .astype(np.float32), "gpu")
    y = backend.to_device(np.random.default_rng(1).integers(0, 10, 32), "gpu")
    result = profile_step(model, x, y, steps=2)
    assert result["total"] > 0 and result["by_category"]["convolution"] > 0
    assert sum(result["by_category"].values()) == pytest.approx(result["total"], rel=1e-6)


def test_step_reducer_on_device_arrays_through_nccl():
    # one rank: NCCL's all-reduce is the identity, but every call of the path runs
    # (unique id, communicator, allReduce on device pointers, stream sync).  Two
    # ranks need two GPUs (NCCL refuses two ranks on one device).
    from tinynorm import parallel

    class OneRankNCCL(parallel.SingleProcess):
        size = 1

        def allreduce_sum(self, buf):
            if isinstance(buf, np.ndarray):
                return buf
            if not hasattr(self, "_nccl"):
                self._nccl = parallel._NCCL(self)
            self._nccl.allreduce_sum(buf)
            return buf
    model = build_model("cifar10_nv", "bn", in_channels=1, num_classes=10, width=0.25)
    model.to("gpu")
    rng = np.random.default_rng(0)
    for _, layer, key in model.named_parameters():
        layer.grads[key] = backend.to_device(
            rng.standard_normal(layer.params[key].shape).astype(np.float32), "gpu")
    before = {k: to_numpy(v).copy() for k, v in model.gradients().items()}
    sums = parallel.StepReducer(OneRankNCCL(), model, bucket_bytes=4096).reduce([2.5, 3.0])
    np.testing.assert_array_equal(sums, [2.5, 3.0])
    for name, g in model.gradients().items():
        assert backend.device_of(g) == "gpu"
        np.testing.assert_array_equal(to_numpy(g), before[name])

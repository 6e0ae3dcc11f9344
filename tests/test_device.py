"""The device option on the CPU: names, errors, moving models and optimizer
state, staging batches, the trainer's device path, the CLI, the require-GPU
test mechanism, and the GPU-only code paths that a fake CuPy or cuDNN frontend
can drive (NCCL's absence, which cuDNN errors mean "not supported", pointer
alignment, dy's device).  (What needs a GPU is in test_gpu.py; the GPU check
script is tested in test_gpu_check.py.)"""
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from tinynorm import backend, config, nn, ops
from tinynorm.cli import main as cli_main
from tinynorm.models import build_model
from tinynorm.optim import SGD, LRSchedule
from tinynorm.runconfig import ConfigError
from tinynorm.train import Trainer, _Data, make_config

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(backend.gpu_available(), reason="checks the no-GPU behaviour")


def test_device_names_and_errors():
    assert backend.check_device("cpu") == "cpu"
    assert backend.xp_for("cpu") is np
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu'; expected 'cpu' or 'gpu'"):
        backend.xp_for("tpu")
    assert issubclass(backend.DeviceError, ValueError)     # the CLI's one-line errors
    assert backend.device_of(np.ones(2)) == "cpu" and backend.device_of(3.0) == "cpu"
    backend.synchronize("cpu")
    backend.synchronize(np.ones(2))


@no_gpu
def test_gpu_requested_without_one_is_one_clear_line():
    with pytest.raises(backend.DeviceError) as e:
        backend.check_device("gpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith("device 'gpu' was requested but no GPU")
    assert backend.default_device() == "cpu"
    backend.synchronize()          # no GPU: nothing to wait for


def _tiny_model(norm="bn"):
    return build_model("cifar10_nv", norm, in_channels=1, num_classes=10, width=1 / 16, seed=0)


def test_model_to_cpu_keeps_arrays_and_reports_its_device():
    model = _tiny_model()
    before = {k: v for k, v in model.state_dict().items()}
    assert model.to("cpu") is model and model.device == "cpu"
    after = model.state_dict()
    assert all(after[k] is before[k] for k in before)      # already there: no copy
    assert nn.ReLU().device == "cpu"                         # a layer without arrays
    with pytest.raises(backend.DeviceError, match="unknown device"):
        model.to("tpu")


@no_gpu
def test_model_to_gpu_without_one_fails_before_touching_the_model():
    model = _tiny_model()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(backend.DeviceError, match="no GPU is usable"):
        model.to("gpu")
    assert model.device == "cpu"
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_layer_to_moves_params_grads_and_buffers_through_to_device(monkeypatch):
    # every array of every layer goes through backend.to_device (the one copy routine)
    model = _tiny_model()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    _, dlogits = ops.softmax_cross_entropy(model(x), np.array([1, 2]))
    model.backward(dlogits)
    seen = []
    monkeypatch.setattr(backend, "to_device", lambda a, device: seen.append(id(a)) or a)
    model.to("cpu")
    expected = {id(a) for _, layer in model.named_layers()
                for store in (layer.params, layer.grads, layer.buffers) for a in store.values()}
    assert set(seen) == expected and len(expected) > 0
    assert any(layer.buffers for _, layer in model.named_layers())   # BN running statistics


def test_sgd_to_and_load_state_dict_copy_onto_the_velocities():
    model = _tiny_model("wn")
    opt = SGD(model, LRSchedule("constant", 0.1, 10), momentum=0.9)
    velocity = {k: v for k, v in opt.velocity.items()}
    assert opt.to("cpu") is opt and all(opt.velocity[k] is velocity[k] for k in velocity)
    state = {k: np.full(v.shape, 0.5, np.float64) for k, v in velocity.items()}  # host, float64
    opt.load_state_dict({"velocity": state, "iteration": 7})
    assert opt.iteration == 7
    for k, v in opt.velocity.items():
        assert v is velocity[k] and v.dtype == np.float32 and np.all(v == 0.5)
    name = next(iter(state))
    with pytest.raises(ValueError, match=f"velocity '{name}': state shape"):
        opt.load_state_dict({"velocity": dict(state, **{name: np.zeros(3)}), "iteration": 0})
    with pytest.raises(KeyError, match="no velocity for"):
        opt.load_state_dict({"velocity": {}, "iteration": 0})


def test_dropout_generator_follows_the_device():
    layer = nn.Dropout(0.5, seed=3)
    layer.to("cpu")
    x = np.ones((4, 8))
    y = layer(x)
    expected = (np.random.default_rng(3).random((4, 8)) >= 0.5) * 2.0
    np.testing.assert_array_equal(y, expected)


def test_host_to_device_on_the_cpu_returns_the_arrays():
    stager = backend.HostToDevice("cpu")
    x, y = np.arange(6.0).reshape(2, 3), np.array([1, 2])
    got = stager.stage((x, y)).get()
    assert got[0] is x and got[1] is y
    with pytest.raises(ValueError, match="slots must be >= 1"):
        backend.HostToDevice("cpu", slots=0)


def test_device_key_is_checked_and_may_change_on_resume():
    from tinynorm.runconfig import RESUME_ALLOWED, validate
    assert make_config()["device"] == "cpu"
    with pytest.raises(ConfigError, match="configuration key 'device': unknown value 'cuda0'"):
        validate(make_config({"device": "cuda0"}))
    assert "device" in RESUME_ALLOWED


def test_prefetched_batches_from_any_start_are_the_batches(synthetic_dataset):
    # the GPU trainer's host side: a worker thread from batch `start` on
    cfg = make_config(dict(batch_size=32, seed=5))
    data = _Data(cfg, dataset=synthetic_dataset())
    for start in (0, 3, data.batches_per_epoch - 1):
        got = list(data.batches.epoch(1, start=start, prefetch=True))
        assert len(got) == data.batches_per_epoch - start
        for b, (x, y) in enumerate(got, start=start):
            x_ref, y_ref = data.train_batch(1, b)
            np.testing.assert_array_equal(x, x_ref)
            np.testing.assert_array_equal(y, y_ref)
    via_trainer = list(data.train_batches(1, 2, "cpu"))
    np.testing.assert_array_equal(via_trainer[0][0], data.train_batch(1, 2)[0])
    # the GPU trainer's worker: train_batch made one ahead in a thread
    from tinynorm.datasets.loader import prefetched
    ahead = list(prefetched(lambda b: data.train_batch(1, b), range(2, data.batches_per_epoch)))
    assert len(ahead) == len(via_trainer) == data.batches_per_epoch - 2
    for (x, y), (x_ref, y_ref) in zip(ahead, via_trainer):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)


def test_trainer_runs_checkpoints_and_resumes_on_its_device(tmp_path, synthetic_dataset):
    # the path the GPU test takes, on the CPU: model, optimizer, batches and the
    # checkpoint all on cfg["device"]
    cfg = dict(model="cifar10_nv", norm="bn", width=1 / 16, batch_size=32, epochs=2,
               lr=0.05, progress=False, seed=1, device="cpu", eval_batch_size=64)
    ds = synthetic_dataset(n_train=128, n_test=32)
    full = Trainer(dict(cfg, out=str(tmp_path / "full")),
                   data=_Data(make_config(cfg), dataset=ds))
    assert full.run(resume=False) == "completed" and full.model.device == "cpu"
    part = Trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=3),
                   data=_Data(make_config(cfg), dataset=ds))
    assert part.run(resume=False) == "completed"
    resumed = Trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=None),
                      data=_Data(make_config(cfg), dataset=ds), resume=True)
    assert resumed.run() == "completed"
    np.testing.assert_array_equal(full.log["iter"]["loss"], resumed.log["iter"]["loss"])
    assert len(full.log["iter"]["loss"]) == 2 * full.data.batches_per_epoch


@no_gpu
def test_trainer_with_device_gpu_fails_before_any_data_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(_Data, "__init__", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(backend.DeviceError, match="no GPU is usable"):
        Trainer(dict(device="gpu", out=str(tmp_path / "run")))


@no_gpu
@pytest.mark.parametrize("argv", [
    ["train", "--device", "gpu", "--out", "{tmp}/run"],
    ["profile", "--device", "gpu", "--model", "deep_linear"],
    ["signal", "--device", "gpu"],
])
def test_cli_device_gpu_without_one_is_one_error_line(argv, tmp_path, capsys):
    code = cli_main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("tinynorm: error: device 'gpu' was requested but no GPU is usable")


def test_cli_profile_on_the_cpu_names_the_device(capsys):
    assert cli_main(["profile", "--model", "deep_linear", "--norm", "wn", "--input", "1x4x4",
                     "--batch-size", "4", "--steps", "1", "--device", "cpu"]) == 0
    assert "device=cpu" in capsys.readouterr().out


def test_cli_info_reports_versions_and_the_conv_path(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"numpy {np.__version__}" in out
    assert "GPU convolution path:" in out and "cuDNN:" in out
    if not backend.gpu_available():
        assert "GPU: not usable:" in out


@no_gpu
def test_gpu_conv_plan_without_cudnn_records_why_and_warns_once():
    from tinynorm.ops import conv
    from tinynorm.ops.conv import cudnn
    ok, reason = cudnn.status()
    assert not ok and reason
    plan = ops.conv_plan((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, np.float32, backend="gpu")
    assert plan.algorithm == "generic" and plan.fallback and plan.reason == reason
    assert reason in repr(plan)
    with config.using(use_cudnn=False):
        chosen = ops.conv_plan((2, 3, 8, 8), (4, 3, 3, 3), 1, 1, np.float32, backend="gpu")
    assert chosen.reason == "use_cudnn is off" and not chosen.fallback
    conv._warned.discard(reason)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv._warn_fallback(plan)
        conv._warn_fallback(plan)
    assert len(caught) == 1 and reason in str(caught[0].message)


# a failure in setup is reported as "error": either way the run exits 1
@pytest.mark.parametrize("require,code,word", [("1", 1, "error"), ("", 0, "skipped")])
@no_gpu
def test_require_gpu_turns_the_gpu_skips_into_failures(require, code, word):
    env = dict(os.environ, TINYNORM_REQUIRE_GPU=require, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_gpu.py::test_cupy_is_usable"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert f"1 {word}" in proc.stdout
    if require:
        assert "TINYNORM_REQUIRE_GPU=1 but no GPU is usable" in proc.stdout


def test_experiment_presets_choose_the_device():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    assert common.resolve_device("cpu") == "cpu" and common.resolve_device("smoke") == "cpu"
    assert common.resolve_device("paper") == backend.default_device()
    if not backend.gpu_available():
        with pytest.raises(SystemExit, match="error: device 'gpu' was requested"):
            common.resolve_device("cpu", "gpu")


# -- GPU-only paths driven by fakes -------------------------------------------------------

def test_nccl_without_libnccl_is_one_parallel_error(monkeypatch):
    # CuPy 14 imports cupy.cuda.nccl where libnccl is missing and sets available=False
    # (its functions then raise AttributeError); _NCCL must say so in one line
    from tinynorm import parallel
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", types.SimpleNamespace(available=False))
    assert backend.nccl() is None
    with pytest.raises(parallel.ParallelError) as e:
        parallel._NCCL(parallel.SingleProcess())
    assert "\n" not in str(e.value) and "cupy.cuda.nccl.available is False" in str(e.value)
    usable = types.SimpleNamespace(available=True)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", usable)
    assert backend.nccl() is usable


class _FakeArray:
    """The little of a CuPy array that ops/conv/cudnn.py touches: shape, dtype, the
    device pointer, copy() (a fresh, aligned allocation)."""
    next_ptr = 1 << 20

    def __init__(self, shape, dtype=np.float32, ptr=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        if ptr is None:
            ptr, _FakeArray.next_ptr = _FakeArray.next_ptr, _FakeArray.next_ptr + (1 << 20)
        self.data = types.SimpleNamespace(ptr=ptr)

    def copy(self):
        return _FakeArray(self.shape, self.dtype)


def _fake_cupy():
    return types.SimpleNamespace(
        ascontiguousarray=lambda a: a,
        empty=lambda shape, dtype: _FakeArray(shape, dtype),
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))


def test_cudnn_gets_only_16_byte_aligned_pointers(monkeypatch):
    from tinynorm.ops.conv import cudnn
    monkeypatch.setattr(backend, "cupy", _fake_cupy())
    seen = []
    monkeypatch.setattr(cudnn, "_run", lambda kind, plan, buffers: seen.append((kind, buffers)))
    plan = types.SimpleNamespace(out_hw=(8, 8))
    base = 1 << 30
    x = _FakeArray((2, 3, 8, 8), ptr=base + 4)          # a view 4 bytes into its buffer
    w = _FakeArray((4, 3, 3, 3), ptr=base + 8)
    dy = _FakeArray((2, 4, 8, 8), ptr=base + 12)
    aligned = _FakeArray((2, 3, 8, 8), ptr=base + 64)
    assert cudnn._aligned(aligned) is aligned             # no copy when it need not
    cudnn.forward(x, w, None, plan)
    cudnn.backward(dy, x, w, plan, need_dx=True, need_dw=True, need_db=False)
    assert [kind for kind, _ in seen] == ["fprop", "dgrad", "wgrad"]
    for kind, buffers in seen:
        for role, a in buffers.items():
            assert a.data.ptr % cudnn.ALIGNMENT == 0, f"{kind} {role} at {a.data.ptr:#x}"
            assert a.shape in (x.shape, w.shape, dy.shape), f"{kind} {role}"


class _NotSupported(Exception):
    """Stands in for cudnn.cudnnGraphNotSupportedError."""


def _fake_frontend(monkeypatch, build):
    from tinynorm.ops.conv import cudnn
    frontend = types.SimpleNamespace(cudnnGraphNotSupportedError=_NotSupported)
    monkeypatch.setattr(backend, "cupy", _fake_cupy())
    monkeypatch.setattr(cudnn, "_frontend", lambda: (frontend, ""))
    monkeypatch.setattr(cudnn, "_graphs", {})
    calls = []

    def counted(mod, kind, key):
        calls.append(kind)
        return build(kind)
    monkeypatch.setattr(cudnn, "_build", counted)
    return cudnn, calls


GEOMETRY = ((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1), np.float32)


def test_cudnn_supports_caches_the_frontends_refusal(monkeypatch):
    def build(kind):
        if kind == "dgrad":
            raise _NotSupported("no engine proposed a plan\nsecond line")
        return object()
    cudnn, calls = _fake_frontend(monkeypatch, build)
    ok, why = cudnn.supports(*GEOMETRY)
    assert not ok and calls == ["fprop", "dgrad"]
    assert why.startswith("cuDNN does not support the dgrad of x (2, 3, 8, 8)")
    assert why.endswith("_NotSupported: no engine proposed a plan")
    assert cudnn.supports(*GEOMETRY) == (False, why) and calls == ["fprop", "dgrad"]  # cached


@pytest.mark.parametrize("error", [TypeError("expected a cudnn.Handle"),
                                   AttributeError("no attribute 'conv_fprop'"),
                                   ValueError("shape deduction failed")])
def test_cudnn_supports_lets_other_errors_through_uncached(monkeypatch, error):
    # an API mismatch is not a property of the geometry: it must surface, every time
    def build(kind):
        raise error
    cudnn, calls = _fake_frontend(monkeypatch, build)
    for _ in range(2):
        with pytest.raises(type(error), match=str(error)):
            cudnn.supports(*GEOMETRY)
    assert calls == ["fprop", "fprop"] and not cudnn._graphs


def test_cudnn_supports_builds_each_pass_once(monkeypatch):
    cudnn, calls = _fake_frontend(monkeypatch, lambda kind: object())
    assert cudnn.supports(*GEOMETRY) == (True, "")
    assert cudnn.supports(*GEOMETRY) == (True, "")
    assert calls == ["fprop", "dgrad", "wgrad"]


def test_cudnn_frontend_without_its_refusal_class_is_unavailable(monkeypatch):
    from tinynorm.ops.conv import cudnn
    frontend = types.SimpleNamespace(pygraph=object, backend_version=lambda: 91000)
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cudnn", frontend)
    mod, reason = cudnn._load()
    assert mod is None and "no cudnnGraphNotSupportedError" in reason
    frontend.cudnnGraphNotSupportedError = _NotSupported
    assert cudnn._load() == (frontend, "")


def test_conv_backward_wants_dy_on_the_forwards_device(monkeypatch):
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    y, cache = ops.conv2d_forward(x, w, None, 1, 1)
    with pytest.raises(ValueError, match="^conv2d_backward: dy must be a NumPy or CuPy array; "
                                         "got list$"):
        ops.conv2d_backward(y.tolist(), cache)
    dy = np.ones_like(y)
    on_cpu = backend.device_of
    monkeypatch.setattr(backend, "device_of", lambda a: "gpu" if a is dy else on_cpu(a))
    with pytest.raises(ValueError, match="^conv2d_backward: dy is on the gpu but the forward "
                                         "ran on the cpu$"):
        ops.conv2d_backward(dy, cache)
    assert ops.conv2d_backward(np.ones_like(y), cache)[0].shape == x.shape


@pytest.mark.parametrize("env,fails", [("1", True), ("", False), ("0", False)])
def test_require_cudnn_turns_the_generic_fallback_into_a_failure(monkeypatch, env, fails):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    from test_gpu import require_cudnn
    monkeypatch.setenv("TINYNORM_REQUIRE_CUDNN", env)
    require_cudnn(True, "")                                  # available: never a failure
    if fails:
        with pytest.raises(pytest.fail.Exception,
                           match="TINYNORM_REQUIRE_CUDNN=1 but the cudnn plan is "
                                 "unavailable: the frontend does not import"):
            require_cudnn(False, "the frontend does not import")
    else:
        require_cudnn(False, "the frontend does not import")

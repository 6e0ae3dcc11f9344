"""Data parallelism (tinynorm.parallel): the reduction, and 2-rank runs under mpirun.

The mpirun tests skip when mpi4py or mpirun is missing, and fail instead under
TINYNORM_REQUIRE_MPI=1 (CI sets it).  Every rank runs single-threaded, so that
the comparisons are of summation order only."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinynorm import parallel
from tinynorm.models import build_model
from tinynorm.train import read_log

from data_markers import HAVE_FMNIST

ROOT = Path(__file__).resolve().parents[1]


def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpirun") is not None


if os.environ.get("TINYNORM_REQUIRE_MPI") == "1" and not _have_mpi():
    raise RuntimeError("TINYNORM_REQUIRE_MPI=1 but mpi4py or mpirun is missing "
                       "(pip install -e '.[mpi]')")
needs_mpi = pytest.mark.skipif(not (_have_mpi() and HAVE_FMNIST),
                               reason="needs mpi4py + mpirun (pip install -e '.[mpi]') "
                                      "and Fashion-MNIST")

# 10 batches of 32 per epoch; 20 iterations = two epochs (checkpoint, checksum, eval)
RUN = dict(model="cifar10_nv", norm="bn", dataset="fashion-mnist", width=0.25, batch_size=32,
           train_limit=320, test_limit=200, lr=0.02, epochs=2, seed=5, progress=False)
ONE_THREAD = dict(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


def _env():
    env = dict(os.environ, **ONE_THREAD)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _mpirun(cfg, fault="", ranks=2, timeout=240, wait=True):
    cmd = ["mpirun", "-np", str(ranks), sys.executable, str(ROOT / "tests" / "mpi_worker.py"),
           json.dumps(cfg), fault]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single(cfg):
    """The reference: one process, single-threaded, in a subprocess like the ranks."""
    return _mpirun(cfg, ranks=1)


def _final_state(run_dir):
    import h5py
    with h5py.File(Path(run_dir) / "checkpoint.h5", "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


def _rel(a, b):
    """Elementwise relative difference (for series of O(1) values: losses)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _rel_tensor(a, b):
    """max |a - b| relative to max |b|: a weight near 0 is compared on the tensor's scale."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


# --------------------------------------------------------------------------- no MPI needed

class FakeComm:
    """Two ranks in one process: the other rank holds ``other`` times this rank's values."""
    rank, size, local_rank, local_size = 0, 2, 0, 1

    def __init__(self, other=3.0):
        self.other, self.calls = other, []

    def allreduce_sum(self, buf):
        self.calls.append(buf.size)
        buf *= 1.0 + self.other
        return buf

    def allgather(self, obj):
        return [obj, obj]


def test_step_reducer_averages_gradients_and_buffers_in_buckets(rng):
    model = build_model("cifar10_nv", "bn", in_channels=1, num_classes=10, width=0.25,
                        dtype=np.float32)
    for _, layer, key in model.named_parameters():
        layer.grads[key] = rng.standard_normal(layer.params[key].shape).astype(np.float32)
    grads = {k: v.copy() for k, v in model.gradients().items()}
    buffers = {k: v.copy() for k, v in model.state_dict().items() if k not in grads}
    comm = FakeComm(other=3.0)
    reducer = parallel.StepReducer(comm, model, bucket_bytes=4096)
    sums = reducer.reduce([1.5, 7.0])
    # (g + 3 g) / 2 = 2 g for every gradient and running statistic; scalars summed
    for name, g in model.gradients().items():
        np.testing.assert_array_equal(g, 2 * grads[name])
    state = model.state_dict()
    for name, b in buffers.items():
        np.testing.assert_array_equal(state[name], 2 * b)
    np.testing.assert_array_equal(sums, [6.0, 28.0])
    # buckets of 4096 bytes: 1024 float32 values, so the float32 buffer takes several calls
    total32 = sum(g.size for g in grads.values()) + sum(b.size for b in buffers.values())
    assert max(comm.calls) <= 1024 and sum(comm.calls) == total32 + 2
    assert len(comm.calls) == math.ceil(total32 / 1024) + 1


def test_together_raises_on_every_rank():
    class Gather(FakeComm):
        def allgather(self, obj):
            return [None, "ValueError: disk on fire"]
    with pytest.raises(parallel.ParallelError, match="rank 1 failed loading: ValueError: disk"):
        parallel.together(Gather(), "loading", lambda: 1)
    assert parallel.together(FakeComm(), "loading", lambda: 42) == 42


def test_launcher_without_mpi4py_is_a_named_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setattr(parallel, "_WORLD", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # import mpi4py -> ImportError
    assert parallel.launched_size() == 4
    with pytest.raises(parallel.ParallelError, match="4 ranks, but mpi4py is not installed"):
        parallel.world()


def test_srun_is_a_launcher_and_an_sbatch_script_is_not(monkeypatch):
    for var in parallel._SIZE_VARS + parallel._RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    # inside an sbatch script: the allocation's task count, no job step
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel.launched_size() == 1
    # a task of `srun -n 4`
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert (parallel.launched_size(), parallel.launched_rank()) == (4, 3)
    # mpirun's own variables win over the srun step that started its daemons
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    assert (parallel.launched_size(), parallel.launched_rank()) == (2, 1)


@pytest.mark.skipif(not _have_mpi(), reason="needs mpi4py + mpirun (pip install -e '.[mpi]')")
def test_a_launcher_that_did_not_start_mpi_is_a_named_error():
    """srun without an MPI plugin: the step announces 3 tasks, MPI sees 1."""
    env = {k: v for k, v in os.environ.items() if k not in parallel._SIZE_VARS}
    env["SLURM_STEP_NUM_TASKS"], env["SLURM_PROCID"] = "3", "0"
    out = subprocess.run([sys.executable, "-c", "from tinynorm import parallel; parallel.world()"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "announced 3 ranks but MPI sees 1" in out.stderr


def test_without_a_launcher_the_run_is_a_single_process(monkeypatch):
    for var in parallel._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_WORLD", None)
    comm = parallel.world()
    assert isinstance(comm, parallel.SingleProcess) and comm.size == 1


def test_state_checksum_sees_one_changed_bit():
    model = build_model("cifar10_nv", "wn", in_channels=1, num_classes=10, width=0.25)
    before = parallel.state_checksum(model)
    w = next(iter(model.parameters().values())).reshape(-1)
    w.view(np.uint32)[0] ^= 1
    assert parallel.state_checksum(model) != before


def test_info_names_mpi_and_the_rank(monkeypatch, capsys):
    from tinynorm.cli import main
    for var in parallel._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(["info"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("MPI:")]
    assert len(line) == 1
    if _have_mpi():
        import mpi4py
        assert f"mpi4py {mpi4py.__version__}" in line[0] and "one process" in line[0]
    monkeypatch.setenv("PMI_SIZE", "3")
    monkeypatch.setenv("PMI_RANK", "2")
    assert ("rank 2 of 3" in parallel.describe()) == _have_mpi()


# --------------------------------------------------------------------------- mpirun

@needs_mpi
@pytest.mark.parametrize("norm", ["bn", "wn"])
def test_two_ranks_equal_one_process_with_bn_chunk_float64(tmp_path, norm):
    cfg = dict(RUN, norm=norm, dtype="float64")
    two = _mpirun(dict(cfg, out=str(tmp_path / "two")))
    assert two.returncode == 0, two.stdout + two.stderr
    one = _single(dict(cfg, bn_chunk=16, out=str(tmp_path / "one")))
    assert one.returncode == 0, one.stdout + one.stderr
    a, b = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert len(a["iter"]["loss"]) == 20
    assert _rel(a["iter"]["loss"], b["iter"]["loss"]) < 1e-10
    assert _rel(a["iter"]["train_acc"], b["iter"]["train_acc"]) == 0
    # the sharded evaluation, reduced, is the whole test set's
    assert _rel(a["epoch"]["test_loss"], b["epoch"]["test_loss"]) < 1e-10
    np.testing.assert_array_equal(a["epoch"]["test_top1"], b["epoch"]["test_top1"])
    sa, sb = _final_state(tmp_path / "two"), _final_state(tmp_path / "one")
    assert sa.keys() == sb.keys()
    for name in sa:          # parameters and the (averaged) running statistics
        assert _rel_tensor(sa[name], sb[name]) < 1e-10, name


@needs_mpi
def test_two_ranks_float32_differ_only_by_round_off(tmp_path):
    two = _mpirun(dict(RUN, out=str(tmp_path / "two")))
    one = _single(dict(RUN, bn_chunk=16, out=str(tmp_path / "one")))
    exact = _single(dict(RUN, bn_chunk=16, dtype="float64", out=str(tmp_path / "f64")))
    for r in (two, one, exact):
        assert r.returncode == 0, r.stdout + r.stderr
    a, b, c = (read_log(tmp_path / d)["iter"]["loss"] for d in ("two", "one", "f64"))
    # What holds on every CPU.  The first loss differs only in how its mean is
    # summed; the second is the first to see a float32 reduction of the ranks'
    # gradients, which differs from one process's sum in summation order alone:
    # a few float32 ulps of the gradient, moved through one update (measured
    # 5e-8 relative on a Zen 3).  A wrong reduction (a missing rank, a sum
    # where a mean belongs, a lost bucket) is off by far more at that step.
    # Later steps are not compared: float32 trajectories of a chaotic process
    # part ways at a rate that depends on the CPU's summation order (one Zen 4
    # reached 4.5e-3 by step 20); that the two-rank algorithm is the
    # one-process one is shown in float64, to 1e-10, by the test above.
    assert abs(a[0] - b[0]) <= 1e-6 * abs(c[0])
    assert abs(a[1] - b[1]) <= 1e-5 * abs(c[1])
    assert np.all(np.isfinite(a)) and len(a) == len(b) == 20


@needs_mpi
def test_ranks_with_different_configurations_are_refused(tmp_path):
    base = dict(RUN, out=str(tmp_path / "run"))
    worker = [sys.executable, str(ROOT / "tests" / "mpi_worker.py")]
    cmd = (["mpirun", "-np", "1"] + worker + [json.dumps(dict(base, lr=0.02))] + [":", "-np", "1"]
           + worker + [json.dumps(dict(base, lr=0.03))])
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "different configurations: 'lr' is 0.02 on rank 0 but 0.03 on rank 1" in r.stdout
    assert not (tmp_path / "run" / "log.h5").exists()


@needs_mpi
def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_resume_is_exact(tmp_path):
    cfg = dict(RUN, epochs=100)           # long enough to be cut
    proc = _mpirun(dict(cfg, out=str(tmp_path / "cut")), wait=False)
    # wait for the first epoch's checkpoint, then SIGTERM rank 1 alone
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoint.h5").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "mpi_worker.py"], capture_output=True,
                                           text=True).stdout.split() if int(p) != proc.pid]
    rank1 = [p for p in pids if any(f"{var}=1".encode() in Path(f"/proc/{p}/environ").read_bytes()
                                    .split(b"\0") for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"))]
    assert len(rank1) == 1, pids
    os.kill(rank1[0], signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "rank 0: interrupted SIGTERM on rank 1" in out and "rank 1: interrupted SIGTERM" in out
    log = read_log(tmp_path / "cut")
    assert log["status"] == "interrupted"
    stopped_at = len(log["iter"]["loss"])
    assert 10 <= stopped_at < 1000
    # a resume on another number of ranks is refused with the reason
    other = _single(dict(cfg, out=str(tmp_path / "cut"), _resume=True))
    assert other.returncode == 1
    assert "was written by a run on 2 rank(s); resume it on 2 (started on 1)" in other.stdout
    # resumed on two ranks (max_iters may change on resume), it gives the numbers of a
    # run that was never interrupted
    end = stopped_at + 4
    resumed = _mpirun(dict(cfg, out=str(tmp_path / "cut"), max_iters=end, _resume=True))
    full = _mpirun(dict(cfg, out=str(tmp_path / "full"), max_iters=end))
    for r in (resumed, full):
        assert r.returncode == 0, r.stdout + r.stderr
    a, b = (read_log(tmp_path / d)["iter"]["loss"] for d in ("cut", "full"))
    assert len(a) == end
    np.testing.assert_array_equal(a, b)


@needs_mpi
def test_ctrl_c_to_mpirun_stops_every_rank_with_one_checkpoint(tmp_path):
    proc = _mpirun(dict(RUN, epochs=100, out=str(tmp_path / "run")), wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.h5").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)          # mpirun forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    assert "rank 0: interrupted SIGINT" in out and "rank 1: interrupted SIGINT" in out, out
    log = read_log(tmp_path / "run")
    # mpirun forwards the signal to both ranks; when rank 1's handler runs
    # first, the step's reduction tells rank 0 of it before its own does
    assert log["status"] == "interrupted"
    assert log["interrupted_reason"] in ("SIGINT", "SIGINT on rank 1")
    # the checkpoint is the stop's: its position is the log's last iteration
    import h5py
    with h5py.File(tmp_path / "run" / "checkpoint.h5", "r") as f:
        assert int(f.attrs["iteration"]) == len(log["iter"]["loss"])
        assert int(f.attrs["ranks"]) == 2


@needs_mpi
def test_a_rank_that_dies_ends_the_run_without_a_hang(tmp_path):
    t0 = time.time()
    r = _mpirun(dict(RUN, out=str(tmp_path / "run")), fault="die", timeout=120)
    assert r.returncode != 0
    assert time.time() - t0 < 100
    assert not (tmp_path / "run" / "checkpoint.h5").exists()   # died before the first epoch end


@needs_mpi
def test_a_rank_that_hangs_is_aborted_by_the_watchdog(tmp_path):
    t0 = time.time()
    r = _mpirun(dict(RUN, out=str(tmp_path / "run"), rank_timeout=4.0), fault="hang",
                timeout=120)
    assert r.returncode != 0
    assert "no reply from the other ranks for 4 s; aborting all ranks" in r.stdout
    assert time.time() - t0 < 100


@needs_mpi
def test_ranks_whose_parameters_drift_apart_stop_with_a_named_error(tmp_path):
    r = _mpirun(dict(RUN, out=str(tmp_path / "run")), fault="perturb")
    assert r.returncode == 1
    assert "error: the parameters of rank(s) 1 differ from rank 0's at iteration 10" in r.stdout
    log = read_log(tmp_path / "run")
    assert log["status"] == "interrupted" and "differ from rank 0's" in log["interrupted_reason"]
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


@needs_mpi
def test_an_experiment_script_under_mpirun_writes_its_figure_once(tmp_path):
    script = ROOT / "experiments" / "linear_divergence.py"
    r = subprocess.run(["mpirun", "-np", "2", sys.executable, str(script), "--preset", "smoke",
                        "--runs", str(tmp_path), "--no-progress"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    base = tmp_path / "smoke" / "linear_divergence"
    assert (base / "linear_divergence.png").exists()
    logs = sorted((base / "logs").glob("*.h5"))
    assert len(logs) == 12                  # 4 cells x 3 lrs, one seed
    # rank 0 alone reports: one line per variant
    assert r.stdout.count("[linear_divergence] wn_xavier_g1_lr1e-03_s0: starting") == 1
    import h5py
    with h5py.File(logs[0], "r") as f:
        assert int(f.attrs["ranks"]) == 2

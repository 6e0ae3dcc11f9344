"""experiments/gpu_check.sh and gpu_check.py on the CPU: the script's dry run up to
its no-GPU exit, the files it leaves where the device tool collects them, the
carried-wheel install, the Python sections at tiny sizes, the package filter of
the versions section, and the per-test timeout and SIGINT evidence the tests
section relies on."""
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinynorm import backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_check.sh"

# what the device tool returns from $OUT (its README's Limits)
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return gpu_check


def _fake_frontend_wheel(folder):
    """A pure-Python wheel named like NVIDIA's cuDNN frontend, whose ``cudnn``
    package says where it came from: installed offline by the script, it must be
    what ``import cudnn`` finds."""
    folder.mkdir()
    path = folder / "nvidia_cudnn_frontend-0.0.1-py3-none-any.whl"
    info = "nvidia_cudnn_frontend-0.0.1.dist-info"
    files = {
        "cudnn/__init__.py": '__version__ = "0.0.1"\n',
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: nvidia-cudnn-frontend\n"
                            "Version: 0.0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tinynorm-tests\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def _files_under(out):
    return sorted(p for p in out.rglob("*") if p.is_file())


@pytest.mark.skipif(backend.gpu_available(), reason="the real run is the validation itself")
def test_dry_run_stops_at_no_gpu_and_leaves_what_the_device_tool_returns(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_INSTALL="0",
               GPU_CHECK_WHEELS=str(_fake_frontend_wheel(tmp_path / "wheels")))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr

    files = _files_under(out)
    names = [p.relative_to(out) for p in files]
    assert names == [Path("gpu_check_logs.tar.gz"), Path("gpu_check_summary.txt")]
    assert len(files) <= MAX_FILES
    for p, rel in zip(files, names):
        assert p.stat().st_size <= MAX_BYTES, rel
        assert len(rel.parts) - 1 <= MAX_DEPTH, rel
        assert all(NAME.match(part) for part in rel.parts), rel

    summary = (out / "gpu_check_summary.txt").read_text()
    assert summary == proc.stdout                       # the summary is what it printed
    assert "[detect] NO GPU:" in summary and "nothing was run on a GPU" in summary
    assert "[wheels] ok" in summary and "[versions] ok" in summary
    assert "GPU convolution path:" in summary           # the versions section's excerpt
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        assert set(members) == {"wheels.log", "versions.log", "versions.json", "detect.log"}
        versions_log = tar.extractfile(members["versions.log"]).read().decode()
        packages = json.load(tar.extractfile(members["versions.json"]))["packages"]
    # the carried wheel went in offline and is the `cudnn` that imports
    assert re.search(r"cuDNN frontend: 0\.0\.1 from .*/site/cudnn", versions_log), versions_log
    assert ["nvidia-cudnn-frontend", "0.0.1"] in [p[:2] for p in packages]


def test_script_parses_and_runs_each_section_under_sigint_timeouts():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    assert 'timeout -s INT -k 20 "$limit"' in text
    # the cuDNN requirement and the tests section's evidence (names as they run, junit)
    assert "export TINYNORM_REQUIRE_CUDNN=1" in text
    for flag in ("-v", "--junitxml=", "-o faulthandler_timeout=", "TINYNORM_TEST_TIMEOUT="):
        assert flag in text, flag


PIP_LIST = """\
Package                   Version
------------------------- -----------
cupy-cuda13x              14.2.0
cuda-toolkit              13.0.1
numba                     0.62.1
numpy                     2.5.2
nvidia-cublas             13.0.0.19
nvidia-cudnn-cu13         9.13.0.50
nvidia-cudnn-frontend     1.32.0
nvidia-nccl-cu13          2.28.3
nvidia-cufft              12.0.0.15
nvidia_cuda_runtime       13.0.88
torch                     2.11.0
torchvision               0.26.0
cupyx-extras              0.1
"""


def test_versions_names_the_cuda13_packages_of_a_pip_list(gpu_check):
    pairs = [line.split() for line in PIP_LIST.splitlines()[2:]]
    names = [name for name, _, _ in gpu_check.relevant_packages(pairs)]
    assert names == ["cupy-cuda13x", "numba", "numpy", "nvidia-cublas", "nvidia-cuda-runtime",
                     "nvidia-cudnn-cu13", "nvidia-cudnn-frontend", "nvidia-nccl-cu13", "torch"]


def test_convs_on_the_cpu_at_tiny_sizes(gpu_check, monkeypatch, capsys):
    rows, failures = gpu_check.convs("cpu", small=True)
    assert failures == []
    # both paths, both dtypes, both geometries, and the misaligned input
    assert len(rows) == 9 and sum(r["misaligned"] for r in rows) == 1
    assert {r["algorithm"] for r in rows if r["path"] == "generic"} == {"generic"}
    assert "generic" not in {r["algorithm"] for r in rows if r["path"] == "default"}
    assert "convs: all 9 ok" in capsys.readouterr().out
    # a wrong result is a failure that names the case
    monkeypatch.setitem(gpu_check.TOL, np.dtype(np.float32), 0.0)
    _, failures = gpu_check.convs("cpu", small=True)
    assert len(failures) == 5 and all("float32" in f and "> 0e+00" in f for f in failures)


def test_compare_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "compare",
                           "--device", "cpu", "--small", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {(r["model"], r["norm"]) for r in rows} >= {("cifar10_nv", "bn"), ("resnet50", "wn"),
                                                       ("deep_linear", "wn")}
    # float32 on the CPU against float64: the loss agrees to float32 precision
    assert all(abs(r["loss"] - r["loss_cpu64"]) < 1e-4 * abs(r["loss_cpu64"]) for r in rows)


def test_bench_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "bench",
                           "--device", "cpu", "--small", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    nets = [k for k in result if k != "conv3x3"]
    assert [k.split(",")[0] for k in nets] == ["cifar10-nv BN", "ResNet-50 BN"]
    assert "ImageNet stem" in nets[1]
    for row in (result[k] for k in nets):
        assert row["tinynorm_ms"] > 0 and np.isfinite(row["tinynorm_first_loss"])
        if "torch_ms" in row:                  # where PyTorch is installed: the same network
            assert row["ratio"] == pytest.approx(row["tinynorm_ms"] / row["torch_ms"])
            assert row["torch_first_loss"] == pytest.approx(row["tinynorm_first_loss"],
                                                            rel=1e-4)
    resnet = result[nets[1]]
    assert 0 < resnet["bn_share"] < 1
    assert resnet["profile"]["by_category"]["batch norm"] > 0
    assert "BN's share of the step:" in proc.stdout


SLEEPY_TESTS = """\
import os, time

def test_quick():
    pass

def test_sleepy():
    open(os.environ["SLEEPY_MARKER"], "w").close()      # the harness may stop us now
    time.sleep(60)

def test_after():
    pass
"""


def _pytest_cmd(folder):
    """pytest -v with junit on ``folder``, which gets tests/conftest.py's copy."""
    (folder / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (folder / "test_sleepy.py").write_text(SLEEPY_TESTS)
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
            f"--junitxml={folder / 'junit.xml'}", str(folder / "test_sleepy.py")]


def _env(folder, **extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), SLEEPY_MARKER=str(folder / "sleeping"),
                **extra)


def test_tinynorm_test_timeout_fails_the_slow_test_and_the_run_goes_on(tmp_path):
    proc = subprocess.run(_pytest_cmd(tmp_path), cwd=tmp_path,
                          env=_env(tmp_path, TINYNORM_TEST_TIMEOUT="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert "TINYNORM_TEST_TIMEOUT: still running after 1 s" in proc.stdout
    assert "time.sleep(60)" in proc.stdout                     # where it was
    assert re.search(r"1 failed, 2 passed in \d", proc.stdout), proc.stdout
    assert 'failures="1"' in (tmp_path / "junit.xml").read_text()


def test_sigint_at_the_section_limit_leaves_the_summary_and_junit(tmp_path):
    # what the tests section's `timeout -s INT` does when a test hangs.  The limit is
    # made to fire once the hung test is running, whatever the machine's load: GNU
    # timeout takes a SIGALRM as its timer's expiry (it sends -s's signal, exits 124)
    import signal
    import time
    proc = subprocess.Popen(["timeout", "-s", "INT", "-k", "20", "600", *_pytest_cmd(tmp_path)],
                            cwd=tmp_path, env=_env(tmp_path, TINYNORM_TEST_TIMEOUT=""),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "sleeping").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "test_sleepy never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGALRM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 124, out
    assert "test_sleepy.py::test_quick PASSED" in out
    assert "test_sleepy.py::test_sleepy" in out                 # the name of the hung test
    assert "KeyboardInterrupt" in out and re.search(r"1 passed in \d", out), out
    assert "test_after" not in out
    assert 'tests="' in (tmp_path / "junit.xml").read_text()

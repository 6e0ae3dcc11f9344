"""tinynorm.config: validation, scoping (exit, exception, nesting, threads),
snapshots, and TINYNORM_NO_NUMBA."""
import os
import subprocess
import sys
import threading

import pytest

import tinynorm
from tinynorm import config
from tinynorm.ops import _gemm


def test_unknown_setting_is_named_in_one_line():
    with pytest.raises(ValueError, match="unknown setting 'winograd_tiles'") as err:
        with config.using(winograd_tiles=2):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        config.get("nope")


@pytest.mark.parametrize("name,value,valid", [
    ("winograd_tile", 3, "'auto', 2 or 4"),
    ("winograd_tile", "4", "'auto', 2 or 4"),
    ("winograd", 1, "a bool"),
    ("conv_chunk_bytes", 0, "an int >= 1"),
    ("conv_threads", 1.5, "None or an int >= 1"),
    ("parallel_kernels", "yes", "'auto', True or False"),
    ("split_min_flops", -1, "an int >= 0"),
    ("use_numba", "off", "a bool"),
])
def test_bad_values_are_named(name, value, valid):
    with pytest.raises(ValueError, match=f"tinynorm.config: {name} must be {valid}; got") as err:
        with config.using(**{name: value}):
            pass
    assert "\n" not in str(err.value)


def test_nothing_changes_when_one_value_is_bad():
    before = config.current()
    with pytest.raises(ValueError):
        with config.using(winograd=False, chunks_per_thread=-1):
            pass
    assert config.current() is before and config.get("winograd") is True


def test_scope_restores_on_exit_exception_and_nesting():
    assert config.get("winograd_tile") == "auto"
    with config.using(winograd_tile=2, winograd=False) as inside:
        assert inside is config.current()
        assert (config.get("winograd_tile"), config.get("winograd")) == (2, False)
        with config.using(winograd=True):
            assert (config.get("winograd_tile"), config.get("winograd")) == (2, True)
        assert config.get("winograd") is False
    assert (config.get("winograd_tile"), config.get("winograd")) == ("auto", True)
    with pytest.raises(RuntimeError, match="boom"):
        with config.using(conv_threads=3):
            assert config.get("conv_threads") == 3
            raise RuntimeError("boom")
    assert config.get("conv_threads") is None
    assert config.current() == config.defaults()


def test_a_snapshot_is_reentered_exactly():
    with config.using(winograd_tile=2, split_min_flops=7):
        snapshot = config.current()
    with config.using(winograd=False):
        with config.using(snapshot):
            assert config.current() is snapshot and config.get("winograd") is True
        with config.using(snapshot, conv_threads=2) as s:
            assert (s.winograd_tile, s.split_min_flops, s.conv_threads) == (2, 7, 2)
        assert config.get("winograd") is False
    with pytest.raises(ValueError, match="Settings snapshot or keywords"):
        with config.using({"winograd": False}):
            pass


def test_a_scope_belongs_to_its_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        with config.using(winograd_tile=2):
            entered.set()
            release.wait(10)
            seen["other"] = config.get("winograd_tile")

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    seen["main"] = config.get("winograd_tile")        # while the other thread is inside
    with config.using(conv_threads=5):
        plain = threading.Thread(target=lambda: seen.setdefault("plain",
                                                                config.get("conv_threads")))
        plain.start()
        plain.join()
    release.set()
    t.join()
    assert seen == {"other": 2, "main": "auto", "plain": None}


def test_tinynorm_worker_threads_see_the_callers_settings():
    """The conv pipeline's jobs run on other threads, in a copy of the
    caller's context."""
    def job():
        return threading.get_ident(), config.get("winograd_chunk_bytes")
    with config.using(winograd_chunk_bytes=123):
        results = _gemm.run_threads([job, job])
    assert results[0][0] != results[1][0]                # two threads ran
    assert [r[1] for r in results] == [123, 123]


def test_describe_lists_every_setting():
    with config.using(winograd_tile=2):
        table = config.describe().splitlines()
    assert len(table) == 1 + len(config.SETTINGS)
    row = next(r for r in table if r.startswith("winograd_tile"))
    assert row.split()[1:3] == ["auto", "2"]              # default, current


def test_no_numba_environment_variable_turns_every_numba_kernel_off():
    code = """
import numpy as np
from tinynorm import config, ops
from tinynorm.ops import batchnorm
assert config.get("use_numba") is False
x = np.random.default_rng(0).standard_normal((4, 16, 8, 8)).astype(np.float32)
w = np.ones((16, 16, 3, 3), np.float32)
y, cache = ops.conv2d_forward(x, w, None, 1, 1)
assert cache.plan.algorithm == "generic", cache.plan
assert ops.max_pool2d_forward(x, 2)[1][0] == "generic"
assert ops.avg_pool2d_forward(x, 2)[1][0] == "generic"
assert not batchnorm.uses_fused_kernel(np.zeros((8, 64, 32, 32), np.float32))
with config.using(use_numba=True, use_onednn=False):
    assert ops.conv_plan(x.shape, w.shape, 1, 1).algorithm == "winograd4"
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tinynorm.__file__)))
    env = dict(os.environ, TINYNORM_NO_NUMBA="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

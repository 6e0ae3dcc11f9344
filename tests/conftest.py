import os
import signal

import numpy as np
import pytest

from tinynorm import backend

# TINYNORM_REQUIRE_GPU=1: a test marked `gpu` FAILS where no GPU is usable instead of
# being skipped -- on a machine that is meant to have one, a skip would hide a broken
# CuPy / CUDA install behind a green run (experiments/gpu_check.sh sets it)
REQUIRE_GPU = os.environ.get("TINYNORM_REQUIRE_GPU", "") not in ("", "0")


def pytest_runtest_setup(item):
    if "gpu" not in item.keywords or backend.gpu_available():
        return
    why = backend._gpu_unusable_reason() or "cupy.is_available() is False"
    if REQUIRE_GPU:
        pytest.fail(f"TINYNORM_REQUIRE_GPU=1 but no GPU is usable: {why}", pytrace=False)
    pytest.skip(f"no GPU: {why}")


@pytest.fixture(autouse=True)
def sigint_as_at_a_terminal():
    """Every test starts with Python's own SIGINT handler (KeyboardInterrupt).

    A shell without job control starts a background command (``pytest &`` in a
    script, CI runners, some IDEs) with SIGINT ignored, and Python keeps an
    ignored SIGINT ignored -- as tinynorm's trainer does, on purpose (an ignored
    signal stays ignored).  The tests that send SIGINT to their own process to
    act out a Ctrl-C then saw no stop at all ("completed" where "interrupted"
    was expected), whatever the machine's speed or load.  The suite's outcome
    must not depend on how it was launched: each test gets the disposition of
    a foreground terminal, and the inherited one is restored after it."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


# TINYNORM_TEST_TIMEOUT=seconds: a test whose call runs longer FAILS with the traceback
# of where it was, and the run goes on (experiments/gpu_check.sh sets it, so that one
# hung GPU test cannot take the section's whole time; pytest-timeout may be missing
# there).  SIGALRM is delivered between Python bytecodes: a test stuck inside one C
# call is stopped when that call returns.  POSIX only; off when unset or 0.
TEST_TIMEOUT = float(os.environ.get("TINYNORM_TEST_TIMEOUT", "") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"TINYNORM_TEST_TIMEOUT: still running after {TEST_TIMEOUT:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def synthetic_dataset():
    """A factory: an in-memory Fashion-MNIST-shaped Dataset (uint8 1x28x28, 10
    classes) whose label is learnable from the image (a bright band per class),
    for trainer runs that must not depend on installed data (the GPU machines)."""
    from tinynorm.datasets.base import ArraySplit, Dataset

    def make(n_train=256, n_test=64, seed=0):
        rng = np.random.default_rng(seed)

        def split(n, name):
            labels = rng.integers(0, 10, n)
            images = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
            for i, c in enumerate(labels):
                images[i, 0, 2 + 2 * c:4 + 2 * c, :] = 220
            return ArraySplit(images, labels, 10, f"synthetic/{name}")
        return Dataset("fashion-mnist", split(n_train, "train"), split(n_test, "test"), 10,
                       source="synthetic")
    return make

"""Shared by the tests that train on real data: whether Fashion-MNIST is
installed (Debian's dataset-fashion-mnist, or a root in TINYNORM_DATA), and the
skip marker for tests that need it."""
import os
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = FMNIST.exists() or bool(os.environ.get("TINYNORM_DATA"))
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

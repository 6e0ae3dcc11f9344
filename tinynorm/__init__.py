"""tinynorm: batch norm vs weight norm, reproduced with hand-written gradients.

Reproduces Gitman & Ginsburg (2017), "Comparison of Batch Normalization and
Weight Normalization Algorithms for the Large-Scale Image Classification".
"""
import os

# OpenBLAS's idle threads spin for a while after every GEMM (its default
# THREAD_TIMEOUT); the numba kernels that run between GEMMs then find both
# cores busy.  A short timeout lets them use both.  It only takes effect when
# tinynorm is imported before NumPy; set it in the environment to override.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# numba's parallel kernels run on its OpenMP threading layer (GNU OpenMP here),
# whose idle workers spin after each parallel region by default and take the
# cores from the OpenBLAS calls and pipeline threads that follow.  Measured
# with `tinynorm profile` (cifar10-nv BN, batch 128, 2 cores): 1.76-1.79 s per
# step spinning, 1.54-1.64 s with passive waiting.  oneDNN's convolutions are
# OpenMP regions too, and on an idle machine spinning wins there (width-0.25
# ResNet-50 BN 750 ms per step with libgomp's default, 970-1080 ms passive;
# Sapphire Rapids, 2 cores) -- but with other work on the machine the spinning
# workers take its time slices: beside three training processes, the test
# suite's cifar10-nv smoke experiment ran over ten minutes and failed, where
# the whole suite takes 14 minutes with passive waiting.  Passive by
# default, then; `OMP_WAIT_POLICY=ACTIVE` in the environment for a machine of
# one's own.  Read when the OpenMP runtime starts (numba's first parallel
# kernel, oneDNN's load, or importing torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from . import settings  # noqa: E402,F401  the scoped settings: tinynorm.settings.using(...)
from . import config  # noqa: E402,F401  its earlier name

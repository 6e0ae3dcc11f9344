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
# step spinning, 1.54-1.64 s with passive waiting.  With oneDNN installed the
# float32 convolutions are OpenMP regions themselves, hundreds per step, and
# the spinning that keeps the workers awake between them wins: width-0.25
# ResNet-50 BN 750 ms per step with libgomp's default against 970-1080 ms
# passive, cifar10-nv BN 145-162 ms against 159-176 ms (2 cores, Sapphire
# Rapids).  So passive waiting only without oneDNN.  Read when the OpenMP
# runtime starts (numba's first parallel kernel, oneDNN's load, or torch's).
def _onednn_installed():
    import importlib.metadata
    try:
        importlib.metadata.distribution("onednn-cpu-gomp")
        return True
    except importlib.metadata.PackageNotFoundError:
        return bool(os.environ.get("TINYNORM_DNNL_LIB"))


if not _onednn_installed():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from . import settings  # noqa: E402,F401  the scoped settings: tinynorm.settings.using(...)
from . import config  # noqa: E402,F401  its earlier name

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

__version__ = "0.1.0"

"""tinynorm: batch norm vs weight norm, reproduced with hand-written gradients.

Reproduces Gitman & Ginsburg (2017), "Comparison of Batch Normalization and
Weight Normalization Algorithms for the Large-Scale Image Classification".
"""
__version__ = "0.1.0"

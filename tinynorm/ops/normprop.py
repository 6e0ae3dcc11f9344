"""Normalization propagation's ReLU (Arpit et al. 2016), paper section 3.2.

    y = c1 * (relu(z) - c0),  c0 = sqrt(1 / (2 pi)),  c1 = 1 / sqrt(0.5 * (1 - 1/pi))

For z ~ N(0, 1), relu(z) is a rectified Gaussian with mean 1/sqrt(2 pi) and
variance 1/2 - 1/(2 pi) = 0.5 (1 - 1/pi), so y has mean 0 and variance 1:
the NormProp layer restores the unit Gaussian its next layer assumes.

Numerical facts (tests check them to 6 digits):
    c0 = 0.3989422804014327   (the standard normal density at 0)
    c1 = 1.712858550449663
A known bug elsewhere uses sqrt(pi / 2) = 1.2533141373155 for c1 (or c0); it
is neither constant: 1/sqrt(0.5 (1 - 1/pi)) != sqrt(pi/2).

The NormProp unit (conv or fully connected) that feeds this ReLU is

    seed paper, section 3.2:     z_j = gamma_j (W_j * x) / ||W_j|| + beta_j
    as Arpit et al. ran it:      z_j = gamma_j (W_j * x) / (1.21 ||W_j||) + beta_j

Their released code multiplies the weight norm by 1.21 in its convolutional
and its fully-connected NormProp layers: the derivation's "z_j ~ N(0, 1)"
holds only for inputs whose covariance is the identity and weight rows that
are orthogonal, and post-ReLU inputs (correlated, and correlated across
neighbouring pixels for a conv) make the variance of W_j x / ||W_j|| larger
than 1; 1.21 = 1.1^2 is their empirical correction.  ``NORMPROP_SCALE`` is
that default (``normprop_scale`` in a run's configuration; 1.0 gives the
seed paper's printed formula).  The division is :func:`weight_norm_forward`
with ``scale``, so it has one backward for both.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module

__all__ = ["NORMPROP_C0", "NORMPROP_C1", "NORMPROP_SCALE", "normprop_relu_forward",
           "normprop_relu_backward"]

NORMPROP_C0 = math.sqrt(1.0 / (2.0 * math.pi))             # E[relu(z)], z ~ N(0, 1)
NORMPROP_C1 = 1.0 / math.sqrt(0.5 * (1.0 - 1.0 / math.pi))  # 1 / std[relu(z)]
NORMPROP_SCALE = 1.21                                       # Arpit et al.'s code


def normprop_relu_forward(z):
    """y = c1 * (relu(z) - c0).

    Parameters
    ----------
    z : float array of any shape (a WN layer's pre-activation)

    Returns y (like z) and the cache (the mask z > 0, boolean, like z).
    """
    xp = get_array_module(z)
    if getattr(z, "dtype", None) is None or z.dtype.kind != "f":
        raise ValueError(f"normprop_relu: z must be a floating-point array, got "
                         f"{getattr(z, 'dtype', type(z).__name__)}")
    mask = z > 0
    c0 = z.dtype.type(NORMPROP_C0)
    c1 = z.dtype.type(NORMPROP_C1)
    y = (xp.maximum(z, 0) - c0) * c1
    return y, mask


def normprop_relu_backward(dy, cache):
    """dz = c1 * dy * [z > 0]  (the subgradient 0 at z = 0).

    Returns (dz,) with dz like dy.
    """
    mask = cache
    return (dy * mask * dy.dtype.type(NORMPROP_C1),)


def gradcheck_cases():
    """(op_label, forward, backward, args, names) for ``python -m tinynorm gradcheck``."""
    rng = np.random.default_rng(13)
    z = rng.standard_normal((4, 3, 5, 5))
    z[np.abs(z) < 1e-3] = 0.5  # keep away from the kink at 0
    # the NormProp units themselves (WN conv/linear with scale, then this ReLU) are
    # checked as the models build them: tinynorm.norms.gradcheck_cases
    return [("normprop_relu", normprop_relu_forward, normprop_relu_backward, (z,), ("z",))]

"""The paper's section-5 network: a deep linear fully-connected network.

``depth`` linear layers without bias and without non-linearity: in_features ->
width -> ... -> width -> num_classes.  norm:

* ``wn``: every layer is WNLinear(gain g, no bias) -- the paper's network;
* ``bn``: Linear(no bias) -> BatchNorm(gamma, beta) for every layer but the last;
* ``none``: plain Linear(no bias).
"""
from __future__ import annotations

import numpy as np

from ..nn import BatchNorm, Flatten, Linear, Sequential, WNLinear

__all__ = ["deep_linear"]


def deep_linear(depth=50, width=64, in_features=784, num_classes=10, norm="wn", *, seed=0,
                dtype=np.float32):
    if norm not in ("wn", "bn", "none"):
        raise ValueError(f"deep_linear norm must be 'wn', 'bn' or 'none', got {norm!r}")
    if depth < 2:
        raise ValueError(f"depth must be at least 2, got {depth}")
    rng = np.random.default_rng(seed)
    dims = [in_features] + [width] * (depth - 1) + [num_classes]
    layers, names = [Flatten()], ["flatten"]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        last = i == depth
        if norm == "wn":
            layer = WNLinear(d_in, d_out, gain=True, bias=False, rng=rng, dtype=dtype)
        else:
            layer = Linear(d_in, d_out, bias=False, rng=rng, dtype=dtype)
            if norm == "bn" and not last:
                layer = Sequential(layer, BatchNorm(d_out, dtype=dtype))
        layers.append(layer)
        names.append(f"fc{i}")
    model = Sequential(*layers, names=names)
    model.probe_layers = {"first": "fc1", "last": f"fc{depth}"}
    return model

"""The paper's section-5 network: a deep linear fully-connected network.

``depth`` linear layers without bias and without non-linearity: in_features ->
width -> ... -> width -> num_classes.  The layers are the norm's
``linear_unit`` (:mod:`tinynorm.norms`):

* ``wn``: every layer is WNLinear(gain g, no bias) -- the paper's network;
* ``bn``: Linear(no bias) -> BatchNorm(gamma, beta) for every layer but the last;
* ``none``: plain Linear(no bias).
"""
from __future__ import annotations

import numpy as np

from ..nn import Flatten, Sequential
from ..norms import NORM_REGISTRY, UnitOptions, get_norm

__all__ = ["deep_linear"]


def deep_linear(depth=50, width=64, in_features=784, num_classes=10, norm="wn", *, seed=0,
                dtype=np.float32, opts=None):
    entry = get_norm(norm)
    if entry.linear_unit is None:
        have = [n for n, e in NORM_REGISTRY.items() if e.linear_unit is not None]
        raise ValueError(f"deep_linear has no {norm!r} variant; choose from {have}")
    if depth < 2:
        raise ValueError(f"depth must be at least 2, got {depth}")
    opts = opts or UnitOptions()
    rng = np.random.default_rng(seed)
    dims = [in_features] + [width] * (depth - 1) + [num_classes]
    flatten = Flatten()
    flatten.signal_input = True        # its output is the input: the gain's denominator
    layers, names = [flatten], ["flatten"]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        layer = entry.linear_unit(d_in, d_out, last=i == depth, rng=rng, dtype=dtype, opts=opts)
        layer.unit_output = True
        layers.append(layer)
        names.append(f"fc{i}")
    model = Sequential(*layers, names=names)
    model.probe_layers = {"first": "fc1", "last": f"fc{depth}"}
    return model

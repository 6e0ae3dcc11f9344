"""Two measurements the paper's explanation of WN's failure rests on.

Signal propagation (``SignalRecorder``, ``tinynorm signal``): the RMS and the
mean of every conv unit's output (the layers ``conv -> norm -> activation``
that :func:`tinynorm.norms.conv_unit` builds, marked ``unit_output``) and of
every residual block's output (marked ``block_output``), in the order the
forward pass produces them:

    rms  = sqrt(mean over (N, C, H, W) of y^2)
    mean = mean over (N, C, H, W) of y

both in float64.  A normalization that keeps its promise keeps the RMS of
every unit near 1 through depth.

Orthogonality (``coherence``): the paper (section 5, footnote 2) says WN fails
because the weights "start to violate orthogonality assumptions during
training" and defines the coherence of a layer as

    max_{i != j} |w_i . w_j| / (||w_i|| ||w_j||)

over its output units i, j; for a conv layer w_i is the flattened filter
(C_in * kh * kw values).  Computed for every conv and linear layer (the
direction v of a WN layer: row scales do not change it).  0 for orthogonal
filters, 1 when two filters are parallel.  A layer with one output unit has
no pair: NaN.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy

__all__ = ["SignalRecorder", "measure_signal", "coherence", "weight_coherences",
           "format_signal"]


class SignalRecorder:
    """Records (rms, mean) of every marked layer's output during forward passes.

    ``with SignalRecorder(model) as rec: model(x)`` then ``rec.names``,
    ``rec.kinds`` ("unit" or "block"), ``rec.rms``, ``rec.mean`` (lists in the
    order the forward pass ran).  Outside the ``with`` the layers record
    nothing and cost nothing.
    """

    def __init__(self, model):
        self._layers = []
        for name, layer in model.named_layers():
            # "input": a layer that passes the network's input through (the deep
            # linear network's Flatten), so that gains are measured from the input
            kind = "block" if getattr(layer, "block_output", False) else \
                "unit" if getattr(layer, "unit_output", False) else \
                "input" if getattr(layer, "signal_input", False) else None
            if kind:
                self._layers.append((name, kind, layer))
        self.clear()

    def clear(self):
        self.names, self.kinds, self.rms, self.mean = [], [], [], []

    def record(self, name, kind, y):
        xp = get_array_module(y)
        y64 = y.astype(xp.float64)
        self.names.append(name)
        self.kinds.append(kind)
        self.rms.append(float(xp.sqrt((y64 * y64).mean())))
        self.mean.append(float(y64.mean()))

    def __enter__(self):
        self.clear()
        for name, kind, layer in self._layers:
            layer._signal_hook = (self, name, kind)
        return self

    def __exit__(self, *exc):
        for _, _, layer in self._layers:
            layer._signal_hook = None
        return False

    def __len__(self):
        return len(self._layers)


def measure_signal(model, x, train=True):
    """RMS and mean of every conv unit's and residual block's output on ``x``.

    ``train=True`` runs the forward pass in training mode (batch statistics for
    BN, as the trainer sees it; BN's running statistics are restored
    afterwards, so measuring changes nothing).  Returns ``{"name", "kind",
    "rms", "mean"}``, each a list in forward order.
    """
    saved = [(layer, {k: v.copy() for k, v in layer.buffers.items()})
             for _, layer in model.named_layers() if layer.buffers]
    was_training = model.training
    model.train(train)
    try:
        with SignalRecorder(model) as rec:
            model.forward(x)
    finally:
        model.train(was_training)
        for layer, buffers in saved:
            for k, v in buffers.items():
                layer.buffers[k][...] = v
    return {"name": list(rec.names), "kind": list(rec.kinds), "rms": list(rec.rms),
            "mean": list(rec.mean)}


def coherence(w) -> float:
    """max_{i != j} |w_i . w_j| / (||w_i|| ||w_j||) over the rows of w reshaped to
    (units, -1); rows of norm 0 are left out; NaN with fewer than two rows."""
    w2 = to_numpy(w).reshape(w.shape[0], -1).astype(np.float64)   # (units, fan_in)
    norms = np.sqrt((w2 * w2).sum(axis=1))
    w2 = w2[norms > 0] / norms[norms > 0, None]
    if w2.shape[0] < 2:
        return float("nan")
    gram = np.abs(w2 @ w2.T)                                        # (units, units)
    np.fill_diagonal(gram, 0.0)
    return float(min(gram.max(), 1.0))


def weight_coherences(model):
    """(names, values): :func:`coherence` of every layer's weight ``w`` or WN
    direction ``v``, in ``model.named_layers()`` order."""
    names, values = [], []
    for name, layer in model.named_layers():
        w = layer.params.get("w", layer.params.get("v"))
        if w is not None and w.ndim >= 2:
            names.append(name)
            values.append(coherence(w))
    return names, values


def format_signal(result) -> str:
    lines = [f"{'#':>3}  {'output of':<28}{'kind':<7}{'rms':>11}{'mean':>11}"]
    for i, (name, kind, rms, mean) in enumerate(zip(result["name"], result["kind"],
                                                    result["rms"], result["mean"])):
        lines.append(f"{i:>3}  {name:<28}{kind:<7}{rms:>11.4g}{mean:>11.4g}")
    return "\n".join(lines)

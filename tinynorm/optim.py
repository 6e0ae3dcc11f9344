"""SGD with momentum and weight decay; learning-rate schedules.

Update (Caffe / Sutskever form, the one the paper's framework used)::

    v <- mu * v - lr * (g + wd * w)      (wd only for decayed parameters)
    w <- w + v

Weight decay applies to the keys in each layer's ``decay_keys``: conv/linear
weights ``w`` and WN directions ``v``.  Biases, BN's gamma/beta, WN's gain g
and TReLU's alpha are not decayed.
"""
from __future__ import annotations

import math

from .backend import get_array_module, to_device

__all__ = ["SGD", "LRSchedule"]


class SGD:
    def __init__(self, model, lr_schedule, momentum=0.9, weight_decay=0.0):
        self.model = model
        self.schedule = lr_schedule
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.velocity = {}
        for name, layer, key in model.named_parameters():
            p = layer.params[key]
            self.velocity[name] = get_array_module(p).zeros_like(p)
        self.iteration = 0

    @property
    def lr(self) -> float:
        return self.schedule(self.iteration)

    def step(self):
        """Apply one update with the lr of the current iteration, in place."""
        lr = self.lr
        mu = self.momentum
        for name, layer, key in self.model.named_parameters():
            p, g, v = layer.params[key], layer.grads[key], self.velocity[name]
            wd = self.weight_decay if key in layer.decay_keys else 0.0
            # v = mu*v - lr*(g + wd*p), written without temporaries of p's size
            v *= mu
            v -= lr * g
            if wd:
                v -= (lr * wd) * p
            p += v
        self.iteration += 1
        return lr

    def to(self, device: str):
        """Move the velocities to ``device`` ("cpu" / "gpu"), as ``model.to`` moves
        the parameters they update; returns self."""
        for name, v in self.velocity.items():
            self.velocity[name] = to_device(v, device)
        return self

    def state_dict(self) -> dict:
        return {"velocity": self.velocity, "iteration": self.iteration}

    def load_state_dict(self, state):
        """Copy velocities (NumPy or CuPy arrays) into the existing ones, onto
        their device; a missing name or a shape mismatch is a one-line error."""
        for name, v in self.velocity.items():
            if name not in state["velocity"]:
                raise KeyError(f"optimizer state has no velocity for {name!r}")
            src = state["velocity"][name]
            if tuple(src.shape) != tuple(v.shape):
                raise ValueError(f"velocity '{name}': state shape {tuple(src.shape)} != "
                                 f"parameter shape {tuple(v.shape)}")
            xp = get_array_module(v)
            # CuPy refuses to assign a NumPy array into a device array: copy it over
            v[...] = xp.asarray(src, dtype=v.dtype)
        self.iteration = int(state["iteration"])


class LRSchedule:
    """lr(t) for iteration t of ``total`` iterations.

    kinds:
      * ``constant``: lr0
      * ``linear``: lr0 -> final linearly over the run
      * ``poly``: final + (lr0 - final) * (1 - t/total) ** power
    Optional warm-up: the first ``warmup`` iterations rise linearly from
    lr0/warmup to lr0, then the schedule runs over the remaining iterations.
    """

    KINDS = ("constant", "linear", "poly")

    def __init__(self, kind, lr0, total, final=0.0, power=2.0, warmup=0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown lr schedule {kind!r}; choose from {self.KINDS}")
        if total <= 0:
            raise ValueError(f"the schedule needs total > 0 iterations, got {total}")
        if not (math.isfinite(lr0) and lr0 > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr0}")
        self.kind, self.lr0, self.total = kind, float(lr0), int(total)
        self.final, self.power, self.warmup = float(final), float(power), int(warmup)

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return self.lr0 * (t + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        frac = min(max((t - self.warmup) / span, 0.0), 1.0)
        if self.kind == "constant":
            return self.lr0
        if self.kind == "linear":
            return self.lr0 + (self.final - self.lr0) * frac
        return self.final + (self.lr0 - self.final) * (1.0 - frac) ** self.power

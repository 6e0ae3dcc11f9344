"""The ResNet bottleneck block; conv units come from the norm registry.

``conv_unit`` and ``activation`` are :mod:`tinynorm.norms`'s (re-exported here):
the table of what each normalization's unit is lives there.
"""
from __future__ import annotations

from ..nn import Identity, Layer, Sequential
from ..norms import UnitOptions, activation, conv_unit, norm_names, residual_scale
from .. import settings
from ..ops._elementwise import add, add_into, add_relu

__all__ = ["NORMS", "conv_unit", "activation", "Bottleneck"]



def __getattr__(name):
    # NORMS: the registry's norms when asked (a norm registered later is one of them)
    if name == "NORMS":
        return norm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Bottleneck(Layer):
    """ResNet bottleneck: 1x1 (mid) -> 3x3 (mid, stride) -> 1x1 (out), plus shortcut.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5").  The
    shortcut is the identity when shape is kept, else a 1x1 projection conv
    with stride (plus its norm).  The output is ``act(scale * (branch + shortcut))``
    with ``scale`` the norm's residual scale (:func:`tinynorm.norms.residual_scale`:
    1/sqrt(2) for NormProp, the paper's modification, 1 for every other norm,
    or ``opts.residual_scale``).  Marked ``block_output`` for the signal
    measurements.
    """

    def __init__(self, norm, c_in, mid, c_out, stride=1, *, rng, dtype, opts=None):
        super().__init__()
        opts = opts or UnitOptions()
        unit = dict(rng=rng, dtype=dtype, opts=opts)
        self.children["branch"] = Sequential(
            *conv_unit(norm, c_in, mid, 1, **unit),
            *conv_unit(norm, mid, mid, 3, stride, 1, **unit),
            *conv_unit(norm, mid, c_out, 1, act=False, **unit))
        if stride != 1 or c_in != c_out:
            self.children["shortcut"] = Sequential(
                *conv_unit(norm, c_in, c_out, 1, stride, act=False, **unit))
        else:
            self.children["shortcut"] = Identity()
        self.children["act"] = activation(norm, c_out, dtype, opts)
        self.scale = residual_scale(norm, opts)
        self.block_output = True

    def forward(self, x):
        # out of place: the branch's last layer may keep its output for backward
        branch, shortcut = self.children["branch"](x), self.children["shortcut"](x)
        act = self.children["act"]
        if (self.scale == 1.0 and type(act).__dict__.get("takes_relu_output", False)
                and settings.get("fuse_relu")):
            # sum and ReLU in one pass (the act's output and cache, as unfused)
            return act.adopt_relu_output(add_relu(branch, shortcut))
        s = add(branch, shortcut)
        if self.scale != 1.0:
            s *= s.dtype.type(self.scale)
        return self.children["act"](s)

    def backward(self, dy):
        ds = self.children["act"].backward(dy)
        if self.scale != 1.0:
            ds = ds * ds.dtype.type(self.scale)
        dx = self.children["branch"].backward(ds)
        add_into(dx, self.children["shortcut"].backward(ds))
        return dx

    def __repr__(self):
        return f"Bottleneck(scale={self.scale:.4g})"

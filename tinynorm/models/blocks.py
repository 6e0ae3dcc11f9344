"""Conv units per normalization, and the ResNet bottleneck block.

``conv_unit(norm, ...)`` returns the layers that replace "conv -> (norm) ->
activation" for each normalization:

=========  ==========================================================
norm       conv unit
=========  ==========================================================
none       Conv2d(bias) -> ReLU
bn         Conv2d(no bias) -> BatchNorm(gamma, beta) -> ReLU
wn         WNConv2d(v, g, b) -> ReLU
normprop   WNConv2d(v, g=gamma (starts at 1), b=beta) -> NormPropReLU
trelu      WNConv2d(v only: w = v/||v||) -> TReLU(alpha)
=========  ==========================================================

``act=False`` drops the activation (the last conv of a bottleneck and the
projection shortcut, whose activation comes after the residual sum).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..nn import (BatchNorm, Conv2d, Identity, Layer, NormPropReLU, ReLU, Sequential,
                  TReLU, WNConv2d)

__all__ = ["NORMS", "conv_unit", "activation", "Bottleneck"]

NORMS = ("none", "bn", "wn", "normprop", "trelu")


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")


def activation(norm, channels, dtype):
    _check_norm(norm)
    if norm == "normprop":
        return NormPropReLU()
    if norm == "trelu":
        return TReLU(channels, dtype=dtype)
    return ReLU()


def conv_unit(norm, c_in, c_out, kernel, stride=1, pad=0, *, act=True, rng, dtype,
              bn_chunk=None):
    """The layers of one "conv -> norm -> activation" unit, as a list."""
    _check_norm(norm)
    kw = dict(rng=rng, dtype=dtype)
    if norm == "none":
        layers = [Conv2d(c_in, c_out, kernel, stride, pad, bias=True, **kw)]
    elif norm == "bn":
        layers = [Conv2d(c_in, c_out, kernel, stride, pad, bias=False, **kw),
                  BatchNorm(c_out, chunk=bn_chunk, dtype=dtype)]
    elif norm == "wn":
        layers = [WNConv2d(c_in, c_out, kernel, stride, pad, gain=True, bias=True, **kw)]
    elif norm == "normprop":
        # g = 1, b = 0 at the start: the values NormProp's constants are derived for
        layers = [WNConv2d(c_in, c_out, kernel, stride, pad, gain=True, bias=True,
                           g_init=1.0, **kw)]
    else:  # trelu: the direction only; gamma/beta live on the network's last layer
        layers = [WNConv2d(c_in, c_out, kernel, stride, pad, gain=False, bias=False, **kw)]
    if act:
        layers.append(activation(norm, c_out, dtype))
    return layers


class Bottleneck(Layer):
    """ResNet bottleneck: 1x1 (mid) -> 3x3 (mid, stride) -> 1x1 (out), plus shortcut.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5").  The
    shortcut is the identity when shape is kept, else a 1x1 projection conv
    with stride (plus its norm).  The output is ``act(scale * (branch + shortcut))``:

    * ``scale = 1`` for none, bn, wn (the standard block);
    * ``scale = 1/sqrt(2)`` for normprop and trelu.  Both inputs of the sum
      are approximately N(0, 1) per unit under NormProp's assumptions and
      independent, so their sum has variance 2; scaling by 1/sqrt(2) restores
      unit variance before the (normprop or translated) ReLU, which is the
      modification the paper says NormProp needs for residual connections.
    """

    def __init__(self, norm, c_in, mid, c_out, stride=1, *, rng, dtype, bn_chunk=None):
        super().__init__()
        unit = dict(rng=rng, dtype=dtype, bn_chunk=bn_chunk)
        self.children["branch"] = Sequential(
            *conv_unit(norm, c_in, mid, 1, **unit),
            *conv_unit(norm, mid, mid, 3, stride, 1, **unit),
            *conv_unit(norm, mid, c_out, 1, act=False, **unit))
        if stride != 1 or c_in != c_out:
            self.children["shortcut"] = Sequential(
                *conv_unit(norm, c_in, c_out, 1, stride, act=False, **unit))
        else:
            self.children["shortcut"] = Identity()
        self.children["act"] = activation(norm, c_out, dtype)
        self.scale = 1.0 / math.sqrt(2.0) if norm in ("normprop", "trelu") else 1.0

    def forward(self, x):
        # out of place: the branch's last layer may keep its output for backward
        s = self.children["branch"](x) + self.children["shortcut"](x)
        if self.scale != 1.0:
            s *= self.scale
        return self.children["act"](s)

    def backward(self, dy):
        ds = self.children["act"].backward(dy)
        if self.scale != 1.0:
            ds = ds * self.scale
        dx = self.children["branch"].backward(ds)
        dx += self.children["shortcut"].backward(ds)
        return dx

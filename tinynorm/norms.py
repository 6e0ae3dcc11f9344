"""The normalizations, one registry entry each.

Everything that depends on the choice of normalization -- the models' conv
units, activations and heads, ResNet's residual scale, the deep linear
network's layers, ``tinynorm profile``'s categories, the plots' labels and
colours, the command line's ``--norm`` choices -- reads this table, so adding
a normalization is one :func:`register_norm` call (the README's "Writing your
own normalization" does it for RMS norm).

=========  ==========================================================  ==========
norm       conv unit (``act=False``: without the activation)           residual
=========  ==========================================================  ==========
none       Conv2d(bias) -> ReLU                                        1
bn         Conv2d(no bias) -> BatchNorm(gamma, beta) -> ReLU           1
wn         WNConv2d(v, g, b) -> ReLU                                   1
normprop   WNConv2d(v, g=gamma, b=beta, norm x 1.21) -> NormPropReLU   1/sqrt(2)
trelu      WNConv2d(v only: w = v/||v||) -> TReLU(alpha)               1
=========  ==========================================================  ==========

How the units start (``UnitOptions``: the run configuration's unit keys,
rows of :mod:`tinynorm.runconfig`): weights from ``init`` (Caffe's xavier filler by default, see
:mod:`tinynorm.nn.init`); WN gains g from ``wn_g_init`` ("one": unit-norm
filters, the paper's gamma started like BN's; "norm": g = ||v||); NormProp's
norm scale ``normprop_scale`` (1.21, as its authors ran it; 1.0 is the seed
paper's printed formula, see :mod:`tinynorm.ops.normprop`).  NormProp's gamma
always starts at 1, the value its constants are derived for.

Residual scale: ResNet's bottleneck computes act(s (branch + shortcut)).
The paper modifies the residual block for NormProp only ("to ensure that
output of each layer stays normal"): under NormProp's assumptions both terms
of the sum are N(0, 1) per unit and independent, so the sum has variance 2
and s = 1/sqrt(2) restores unit variance before the NormProp ReLU.  Every
other norm, TReLU WN included, uses the standard block (s = 1).  The run
configuration's ``residual_scale`` ("auto" = the entry's value, or a number)
overrides it for any norm.

TReLU WN's gamma and beta ("applied only to the output of the last layer"):
the last layer is taken to be the network's classifier output -- the WNLinear
head of ResNet-50 (its g and b are gamma and beta), and for cifar10-nv, which
has no linear layer, a ScaleShift after conv9's TReLU, before the global
average pool.  Every hidden unit is w = v/||v|| followed by the TReLU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import nn, runconfig
from .runconfig import Key, UnitOptions

__all__ = ["Norm", "Key", "UnitOptions", "register_norm", "get_norm", "norm_names", "conv_unit",
           "activation", "residual_scale", "label_of", "color_of", "NORM_REGISTRY"]


@dataclass(frozen=True)
class Norm:
    """One normalization: how the models build it and how it is shown.

    conv_unit(c_in, c_out, kernel, stride, pad, *, rng, dtype, opts) -> list of
        layers for "conv -> norm" (without the activation)
    activation(channels, *, dtype, opts) -> the activation layer
    head(d_in, d_out, *, rng, dtype, opts) -> ResNet's classifier layer
    linear_unit(d_in, d_out, *, last, rng, dtype, opts) -> one layer of the deep
        linear network (None: the norm has no linear network)
    output_layer(channels, *, dtype) -> a layer after cifar10-nv's last unit, or None
    cifar10_nv_units: the cifar10-nv convs that carry this norm (None: all;
        the others are plain conv -> ReLU); Table 2 puts BN after conv3, conv6 only
    residual_scale: s of ResNet's act(s (branch + shortcut))
    profile_categories: layer class name -> Figure 1 category for the classes
        this norm adds
    options: rows (:class:`tinynorm.runconfig.Key`) of the norm's own options:
        registering the norm makes each a configuration key, a unit option
        (``opts.<name>`` in its builders) and a command-line flag
    """
    name: str
    label: str
    color: str
    conv_unit: Callable
    activation: Callable
    head: Callable
    residual_scale: float = 1.0
    linear_unit: Optional[Callable] = None
    output_layer: Optional[Callable] = None
    cifar10_nv_units: Optional[tuple] = None
    profile_categories: dict = field(default_factory=dict)
    description: str = ""
    options: tuple = ()


NORM_REGISTRY: dict = {}


def register_norm(norm: Norm, *, replace=False) -> Norm:
    if not replace and norm.name in NORM_REGISTRY:
        raise ValueError(f"norm {norm.name!r} is already registered (pass replace=True)")
    for key in norm.options:      # the norm's options: configuration keys and unit options
        runconfig.add_key(dataclasses.replace(key, unit=True, section="model"),
                          owner=f"norm {norm.name}", replace=replace)
    NORM_REGISTRY[norm.name] = norm
    return norm


def norm_names() -> tuple:
    return tuple(NORM_REGISTRY)


def get_norm(name) -> Norm:
    if isinstance(name, Norm):
        return name
    try:
        return NORM_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose from {norm_names()}") from None


def label_of(name) -> str:
    return NORM_REGISTRY[name].label if name in NORM_REGISTRY else str(name)


def color_of(name):
    return NORM_REGISTRY[name].color if name in NORM_REGISTRY else None


# -- what the models call -----------------------------------------------------------

def conv_unit(norm, c_in, c_out, kernel, stride=1, pad=0, *, act=True, rng, dtype,
              opts=None):
    """The layers of one "conv -> norm -> activation" unit, as a list; the last
    one is marked ``unit_output`` (what :mod:`tinynorm.diagnostics` measures)."""
    entry = get_norm(norm)
    opts = opts or UnitOptions()
    layers = list(entry.conv_unit(c_in, c_out, kernel, stride, pad, rng=rng, dtype=dtype,
                                  opts=opts))
    if act:
        layers.append(entry.activation(c_out, dtype=dtype, opts=opts))
    layers[-1].unit_output = True
    return layers


def activation(norm, channels, dtype, opts=None):
    return get_norm(norm).activation(channels, dtype=dtype, opts=opts or UnitOptions())


def residual_scale(norm, opts=None) -> float:
    opts = opts or UnitOptions()
    if opts.residual_scale == "auto":
        return float(get_norm(norm).residual_scale)
    return float(opts.residual_scale)


# -- the built-in entries -------------------------------------------------------------

def _relu(channels, *, dtype, opts):
    return nn.ReLU()


def _plain_head(d_in, d_out, *, rng, dtype, opts):
    return nn.Linear(d_in, d_out, bias=True, rng=rng, init=opts.init, dtype=dtype)


def _wn_head(d_in, d_out, *, rng, dtype, opts):
    return nn.WNLinear(d_in, d_out, gain=True, bias=True, g_init=opts.wn_g_init, rng=rng,
                       init=opts.init, dtype=dtype)


def _plain_linear(d_in, d_out, *, last, rng, dtype, opts):
    return nn.Linear(d_in, d_out, bias=False, rng=rng, init=opts.init, dtype=dtype)


register_norm(Norm(
    "none", "no norm", "tab:gray",
    conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
        nn.Conv2d(c_in, c_out, k, s, p, bias=True, rng=rng, init=opts.init, dtype=dtype)],
    activation=_relu, head=_plain_head, linear_unit=_plain_linear,
    profile_categories={"Conv2d": "convolution", "ReLU": "relu"},
    description="no normalization"))


def _bn_linear(d_in, d_out, *, last, rng, dtype, opts):
    layer = _plain_linear(d_in, d_out, last=last, rng=rng, dtype=dtype, opts=opts)
    return layer if last else nn.Sequential(layer, nn.BatchNorm(
        d_out, eps=opts.bn_eps, chunk=opts.bn_chunk, dtype=dtype))


register_norm(Norm(
    "bn", "BN", "tab:blue",
    conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
        nn.Conv2d(c_in, c_out, k, s, p, bias=False, rng=rng, init=opts.init, dtype=dtype),
        nn.BatchNorm(c_out, eps=opts.bn_eps, chunk=opts.bn_chunk, dtype=dtype)],
    activation=_relu, head=_plain_head, linear_unit=_bn_linear,
    cifar10_nv_units=("conv3", "conv6"),
    profile_categories={"BatchNorm": "batch norm"},
    description="batch normalization, per-chunk statistics with bn_chunk"))

register_norm(Norm(
    "wn", "WN", "tab:orange",
    conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
        nn.WNConv2d(c_in, c_out, k, s, p, gain=True, bias=True, g_init=opts.wn_g_init,
                    rng=rng, init=opts.init, dtype=dtype)],
    activation=_relu, head=_wn_head,
    linear_unit=lambda d_in, d_out, *, last, rng, dtype, opts: nn.WNLinear(
        d_in, d_out, gain=True, bias=False, g_init=opts.wn_g_init, rng=rng, init=opts.init,
        dtype=dtype),
    profile_categories={"WNConv2d": "convolution"},
    description="weight normalization, o = g (v * x)/||v|| + b"))

register_norm(Norm(
    "normprop", "NormProp", "tab:green",
    # g = gamma = 1, b = beta = 0 at the start: the values NormProp's constants are derived for
    conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
        nn.WNConv2d(c_in, c_out, k, s, p, gain=True, bias=True, g_init="one",
                    norm_scale=opts.normprop_scale, rng=rng, init=opts.init, dtype=dtype)],
    activation=lambda channels, *, dtype, opts: nn.NormPropReLU(),
    # the classifier is not followed by a NormProp ReLU: plain WN, gamma = 1
    head=lambda d_in, d_out, *, rng, dtype, opts: nn.WNLinear(
        d_in, d_out, gain=True, bias=True, g_init="one", rng=rng, init=opts.init, dtype=dtype),
    residual_scale=1.0 / math.sqrt(2.0),
    profile_categories={"WNConv2d": "convolution", "NormPropReLU": "relu"},
    description="normalization propagation, z = gamma (W * x)/(1.21 ||W||) + beta"))

register_norm(Norm(
    "trelu", "TReLU WN", "tab:red",
    conv_unit=lambda c_in, c_out, k, s, p, *, rng, dtype, opts: [
        nn.WNConv2d(c_in, c_out, k, s, p, gain=False, bias=False, rng=rng, init=opts.init,
                    dtype=dtype)],
    activation=lambda channels, *, dtype, opts: nn.TReLU(channels, dtype=dtype),
    head=_wn_head,
    output_layer=lambda channels, *, dtype: nn.ScaleShift(channels, dtype=dtype),
    profile_categories={"WNConv2d": "convolution", "TReLU": "relu"},
    description="WN with translated ReLU; gamma/beta on the last layer only"))


# -- what `tinynorm gradcheck` checks -----------------------------------------------

def unit_gradcheck_cases(name, *, opts=None):
    """(label, layer, input) for one registered norm's units, built by the same
    calls the models make (float64, train mode): the conv unit with its
    activation (3x3 stride 1 and 1x1 stride 2, ResNet's two shapes), ResNet's
    head, the deep linear network's hidden and last layers, and cifar10-nv's
    output layer -- whichever the norm defines.  Parameters are moved off their
    starting values (gamma = 1, beta = alpha = 0 would hide mistakes).  The data
    come from a generator seeded by the norm's name, so a case is the same on
    every run and machine (a finite difference across a ReLU kink would fail
    it every time, not now and then)."""
    import numpy as np
    entry = get_norm(name)
    opts = opts or UnitOptions()
    rng = np.random.default_rng(sum(map(ord, entry.name)))
    kw = dict(rng=rng, dtype=np.float64, opts=opts)
    x4 = rng.standard_normal((4, 3, 5, 5))
    units = [
        ("conv 3x3 + act", nn.Sequential(*conv_unit(entry, 3, 4, 3, 1, 1, **kw)), x4),
        ("conv 1x1 stride 2 + act", nn.Sequential(*conv_unit(entry, 3, 4, 1, 2, 0, **kw)), x4),
        ("head", entry.head(6, 4, **kw), rng.standard_normal((5, 6))),
    ]
    if entry.linear_unit is not None:
        for last in (False, True):
            units.append((f"linear unit{' (last)' if last else ''}",
                          entry.linear_unit(6, 6, last=last, **kw), rng.standard_normal((8, 6))))
    if entry.output_layer is not None:
        units.append(("output layer", entry.output_layer(3, dtype=np.float64), x4))
    cases = []
    for what, layer, x in units:
        for _, owner, key in layer.named_parameters():
            p = owner.params[key]
            p += 0.1 * rng.standard_normal(p.shape)
        cases.append((f"unit {entry.name}: {what}", layer, x))
    return cases


def gradcheck_cases():
    """The units of every registered norm (a norm registered from the user's own
    module included), for ``tinynorm gradcheck``."""
    return [case for name in norm_names() for case in unit_gradcheck_cases(name)]

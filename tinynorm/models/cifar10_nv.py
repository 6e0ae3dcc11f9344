"""cifar10-nv, the paper's Table 2.

    layer              kernel / stride / pad    output (3x28x28 input)
    conv1-ReLU         3x3x128  /1 /1           128x28x28
    conv2-ReLU         3x3x128  /1 /1           128x28x28
    conv3-BN-ReLU      3x3x128  /1 /1           128x28x28
    MAX-pool3          3x3      /2 /1           128x14x14
    conv4-ReLU         3x3x256  /1 /1           256x14x14
    conv5-ReLU         3x3x256  /1 /1           256x14x14
    conv6-BN-ReLU      3x3x256  /1 /1           256x14x14
    MAX-pool6          3x3      /2 /1           256x7x7
    conv7-ReLU         3x3x320  /1 /0           320x5x5
    conv8-ReLU         1x1x320  /1 /0           320x5x5
    conv9-ReLU         1x1x10   /1 /0           10x5x5
    AVE-pool9          5x5 (global)             10x1x1
    softmax-loss

The pools use pad 1 with floor rounding, which gives Table 2's 14 and 7 (Caffe
gets the same sizes with pad 0 and ceil rounding).  BN sits only after conv3
and conv6 (Table 2; the registry entry's ``cifar10_nv_units``); the WN-family
norms replace every conv.  For trelu the last layer carries gamma and beta:
conv9 -> TReLU -> ScaleShift (the entry's ``output_layer``).
"""
from __future__ import annotations


import numpy as np

from ..nn import GlobalAvgPool2d, MaxPool2d, Sequential
from ..norms import UnitOptions, conv_unit, get_norm

__all__ = ["cifar10_nv"]

# (name, out channels, kernel, pad) of conv1..conv9; the pools follow conv3 and conv6
_CONVS = [("conv1", 128, 3, 1), ("conv2", 128, 3, 1), ("conv3", 128, 3, 1),
          ("conv4", 256, 3, 1), ("conv5", 256, 3, 1), ("conv6", 256, 3, 1),
          ("conv7", 320, 3, 0), ("conv8", 320, 1, 0), ("conv9", None, 1, 0)]


def cifar10_nv(norm="bn", in_channels=3, num_classes=10, width=1.0, *, seed=0,
               dtype=np.float32, bn_chunk=None, opts=None):
    """Build cifar10-nv.  ``width`` scales every hidden channel count (conv9 keeps
    ``num_classes``); ``opts`` (:class:`tinynorm.norms.UnitOptions`) sets the
    init, WN's g and NormProp's scale (``bn_chunk``, if given, overrides its
    bn_chunk).  Children are named conv1..conv9 (each a Sequential of its conv
    unit), pool3, pool6, pool9 (and scale for trelu)."""
    entry = get_norm(norm)
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    opts = opts or UnitOptions()
    if bn_chunk is not None:
        opts = opts.replace(bn_chunk=bn_chunk)
    rng = np.random.default_rng(seed)
    layers, names = [], []
    c_in = in_channels
    for name, c_out, k, pad in _CONVS:
        c_out = num_classes if c_out is None else max(1, int(round(c_out * width)))
        unit_norm = entry.name
        if entry.cifar10_nv_units is not None and name not in entry.cifar10_nv_units:
            unit_norm = "none"      # e.g. Table 2: BN only after conv3 and conv6
        layers.append(Sequential(*conv_unit(unit_norm, c_in, c_out, k, 1, pad, rng=rng,
                                            dtype=dtype, opts=opts)))
        names.append(name)
        if name in ("conv3", "conv6"):
            layers.append(MaxPool2d(3, 2, 1))
            names.append("pool" + name[-1])
        c_in = c_out
    if entry.output_layer is not None:
        layers.append(entry.output_layer(num_classes, dtype=dtype))
        names.append("scale")
    layers.append(GlobalAvgPool2d())
    names.append("pool9")
    model = Sequential(*layers, names=names)
    model.probe_layers = {"first": "conv1", "last": "conv9"}
    return model

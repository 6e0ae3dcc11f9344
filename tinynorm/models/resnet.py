"""ResNet-50 (He et al. 2016) with a pluggable normalization.

Stages of [3, 4, 6, 3] bottlenecks with 64/128/256/512 mid channels and 4x
expansion (256..2048 out channels at width 1); stride 2 on the first block of
stages 2-4 (on the 3x3 conv, torchvision's v1.5).  Stems:

* ``imagenet``: 7x7/2 conv (64) -> norm -> act -> 3x3/2 max pool (pad 1)
* ``cifar``:    3x3/1 conv (64) -> norm -> act (for 28-32 pixel inputs)

Head: global average pool -> the norm's classifier (``Norm.head``: Linear
for none and bn; WNLinear with gain and bias for the WN family, which for trelu
are the network's gamma and beta).  With BN, 1000 classes and the ImageNet
stem the model has the standard 25,557,032 parameters.

Residual sums are scaled by the norm's residual scale: 1/sqrt(2) for NormProp
only (see :class:`tinynorm.models.blocks.Bottleneck` and :mod:`tinynorm.norms`).
"""
from __future__ import annotations


import numpy as np

from ..nn import Dropout, GlobalAvgPool2d, MaxPool2d, Sequential
from ..norms import UnitOptions, conv_unit, get_norm
from .blocks import Bottleneck

__all__ = ["resnet50", "resnet"]

STAGES_50 = (3, 4, 6, 3)


def resnet(norm="bn", depths=STAGES_50, num_classes=1000, stem="imagenet", width=1.0,
           in_channels=3, bn_chunk=None, *, seed=0, dtype=np.float32, opts=None, dropout=0.0):
    entry = get_norm(norm)
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
    opts = opts or UnitOptions()
    if bn_chunk is not None:
        opts = opts.replace(bn_chunk=bn_chunk)
    rng = np.random.default_rng(seed)
    unit = dict(rng=rng, dtype=dtype, opts=opts)
    ch = lambda c: max(1, int(round(c * width)))  # noqa: E731

    layers, names = [], []
    if stem == "imagenet":
        layers.append(Sequential(*conv_unit(norm, in_channels, ch(64), 7, 2, 3, **unit),
                                 MaxPool2d(3, 2, 1)))
    else:
        layers.append(Sequential(*conv_unit(norm, in_channels, ch(64), 3, 1, 1, **unit)))
    names.append("stem")

    c_in = ch(64)
    for s, (n_blocks, mid) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for b in range(n_blocks):
            stride = 2 if (b == 0 and s > 1) else 1
            c_out = ch(mid * 4)
            layers.append(Bottleneck(norm, c_in, ch(mid), c_out, stride, **unit))
            names.append(f"layer{s}.{b}")
            c_in = c_out
    last_block = names[-1]
    layers.append(GlobalAvgPool2d())
    names.append("pool")
    if dropout:
        # where the paper is silent: on the pooled features, before the classifier
        # (Srivastava et al.'s fully connected placement); its masks seeded by `seed`
        layers.append(Dropout(dropout, seed=seed))
        names.append("dropout")
    layers.append(entry.head(c_in, num_classes, rng=rng, dtype=dtype, opts=opts))
    names.append("fc")
    model = Sequential(*layers, names=names)
    # Figure 4: the outputs of the first layer (stem) and the last residual block
    model.probe_layers = {"first": "stem", "last": last_block}
    return model


def resnet50(norm="bn", num_classes=1000, stem="imagenet", width=1.0, bn_chunk=None,
             in_channels=3, *, seed=0, dtype=np.float32, opts=None, dropout=0.0):
    """ResNet-50; ``bn_chunk`` computes BN statistics per chunk of that many
    samples (64 in the paper's 4-GPU run); ``opts`` as in :func:`resnet`;
    ``dropout``: p of a dropout layer before the classifier (0: none)."""
    return resnet(norm, STAGES_50, num_classes, stem, width, in_channels, bn_chunk,
                  seed=seed, dtype=dtype, opts=opts, dropout=dropout)

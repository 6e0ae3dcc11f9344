"""The paper's networks: cifar10-nv, ResNet-50, the deep linear network."""
from ..norms import UnitOptions
from .cifar10_nv import cifar10_nv
from .deep_linear import deep_linear
from .resnet import resnet, resnet50

__all__ = ["cifar10_nv", "resnet50", "resnet", "deep_linear", "build_model"]

MODELS = ("cifar10_nv", "resnet50", "deep_linear")


def build_model(name, norm, *, in_channels, num_classes, width=1.0, seed=0, dtype=None,
                opts=None, **kw):
    """Build a model by name (used by the trainer and the command line).

    ``opts``: a :class:`tinynorm.norms.UnitOptions` or a dict of its fields
    (init, wn_g_init, normprop_scale, residual_scale, bn_chunk); ``bn_chunk``
    may also be given on its own."""
    import numpy as np
    dtype = dtype or np.float32
    if isinstance(opts, dict):
        opts = UnitOptions(**opts)
    opts = opts or UnitOptions()
    if name == "cifar10_nv":
        return cifar10_nv(norm, in_channels, num_classes, width, seed=seed, dtype=dtype,
                          bn_chunk=kw.get("bn_chunk"), opts=opts)
    if name == "resnet50":
        return resnet50(norm, num_classes, kw.get("stem", "cifar"), width,
                        kw.get("bn_chunk"), in_channels, seed=seed, dtype=dtype, opts=opts,
                        dropout=kw.get("dropout", 0.0))
    if name == "deep_linear":
        return deep_linear(kw.get("depth", 50), kw.get("linear_width", 64),
                           kw["in_features"], num_classes, norm, seed=seed, dtype=dtype,
                           opts=opts)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")

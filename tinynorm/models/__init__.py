"""The paper's networks: cifar10-nv, ResNet-50, the deep linear network."""
from .cifar10_nv import cifar10_nv
from .deep_linear import deep_linear
from .resnet import resnet, resnet50

__all__ = ["cifar10_nv", "resnet50", "resnet", "deep_linear", "build_model"]


def build_model(name, norm, *, in_channels, num_classes, width=1.0, seed=0, dtype=None,
                **kw):
    """Build a model by name (used by the trainer and the command line)."""
    import numpy as np
    dtype = dtype or np.float32
    if name == "cifar10_nv":
        return cifar10_nv(norm, in_channels, num_classes, width, seed=seed, dtype=dtype,
                          bn_chunk=kw.get("bn_chunk"))
    if name == "resnet50":
        return resnet50(norm, num_classes, kw.get("stem", "cifar"), width,
                        kw.get("bn_chunk"), in_channels, seed=seed, dtype=dtype)
    if name == "deep_linear":
        return deep_linear(kw.get("depth", 50), kw.get("linear_width", 64),
                           kw["in_features"], num_classes, norm, seed=seed, dtype=dtype)
    raise ValueError(f"unknown model {name!r}; choose cifar10_nv, resnet50 or deep_linear")

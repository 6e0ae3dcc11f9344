"""Plain layers built on the ops: Conv2d, Linear, activations, pooling, dropout."""
from __future__ import annotations

import numpy as np

from .. import backend, ops
from .base import Layer, _as_pair
from .init import DEFAULT_INIT, initialize

__all__ = ["Conv2d", "Linear", "ReLU", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d",
           "Flatten", "Dropout", "Identity"]


class Conv2d(Layer):
    """y = w * x + b.  params: ``w`` (C_out, C_in, kh, kw), ``b`` (C_out,) if bias."""

    fuses_relu = True   # forward_relu: see tinynorm.nn.base
    fresh_input_grad = True   # backward returns a new dx (tinynorm.nn.base)
    # False: backward computes dw (and db) only and returns None -- for a
    # network's first layer, whose input gradient training never uses
    # (tinynorm.nn.skip_input_grad; PyTorch skips it for an input without
    # requires_grad)
    input_grad = True

    def __init__(self, c_in, c_out, kernel, stride=1, pad=0, bias=True, *, rng=None,
                 init=DEFAULT_INIT, dtype=np.float32):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        kh, kw = _as_pair(kernel)
        self.stride, self.pad = stride, pad
        self.params["w"] = initialize(init, (c_out, c_in, kh, kw), rng, dtype)
        if bias:
            self.params["b"] = np.zeros(c_out, dtype)
        self._cache = None

    def forward(self, x):
        y, self._cache = ops.conv2d_forward(x, self.params["w"], self.params.get("b"),
                                            self.stride, self.pad)
        return y

    def forward_relu(self, x):
        """relu(forward(x)): the ReLU in place on the fresh output (the cache
        holds x and w, never y)."""
        return ops.relu_inplace(self.forward(x))

    def backward(self, dy):
        if self.input_grad:
            dx, dw, db = ops.conv2d_backward(dy, self._cache)
        else:
            dx, (dw, db) = None, ops.conv2d_backward_filter(dy, self._cache)
        self.grads["w"] = dw
        if db is not None:
            self.grads["b"] = db
        self._cache = None
        return dx

    def __repr__(self):
        co, ci, kh, kw = self.params["w"].shape
        return f"Conv2d({ci}, {co}, {kh}x{kw}, stride={self.stride}, pad={self.pad}, bias={'b' in self.params})"


class Linear(Layer):
    """y = x w^T + b.  params: ``w`` (D_out, D_in), ``b`` (D_out,) if bias."""

    def __init__(self, d_in, d_out, bias=True, *, rng=None, init=DEFAULT_INIT, dtype=np.float32):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.params["w"] = initialize(init, (d_out, d_in), rng, dtype)
        if bias:
            self.params["b"] = np.zeros(d_out, dtype)
        self._cache = None

    def forward(self, x):
        y, self._cache = ops.linear_forward(x, self.params["w"], self.params.get("b"))
        return y

    def backward(self, dy):
        dx, dw, db = ops.linear_backward(dy, self._cache)
        self.grads["w"] = dw
        if db is not None:
            self.grads["b"] = db
        self._cache = None
        return dx

    def __repr__(self):
        do, di = self.params["w"].shape
        return f"Linear({di}, {do}, bias={'b' in self.params})"


class _Stateless(Layer):
    """A layer wrapping an op pair with no parameters."""

    def _fwd(self, x):
        raise NotImplementedError

    def _bwd(self, dy, cache):
        raise NotImplementedError

    def forward(self, x):
        y, self._cache = self._fwd(x)
        return y

    def backward(self, dy):
        grads = self._bwd(dy, self._cache)
        self._cache = None
        return grads[0] if isinstance(grads, tuple) else grads


class ReLU(_Stateless):
    takes_relu_output = True   # adopt_relu_output: see tinynorm.nn.base

    def backward_inplace(self, dy):
        """backward(dy), writing dx into dy's memory: for a dy that nothing
        else holds (see tinynorm.nn.base)."""
        (dx,) = ops.relu_backward_inplace(dy, self._cache)
        self._cache = None
        return dx

    def adopt_relu_output(self, z):
        """Take ``z`` = relu(x), computed by the layer before (its
        ``forward_relu``), as this layer's output: the cache relu_forward(x)
        would keep is z itself."""
        self._cache = z
        return self._observed(z)

    def _fwd(self, x):
        return ops.relu_forward(x)

    def _bwd(self, dy, cache):
        return ops.relu_backward(dy, cache)

    def __repr__(self):
        return "ReLU()"


class MaxPool2d(_Stateless):
    fresh_input_grad = True   # backward returns a new array (tinynorm.nn.base)

    def __init__(self, kernel, stride=None, pad=0):
        super().__init__()
        self.kernel, self.stride, self.pad = kernel, stride or kernel, pad

    def _fwd(self, x):
        return ops.max_pool2d_forward(x, self.kernel, self.stride, self.pad)

    def _bwd(self, dy, cache):
        return ops.max_pool2d_backward(dy, cache)

    def __repr__(self):
        return f"MaxPool2d({self.kernel}, stride={self.stride}, pad={self.pad})"


class AvgPool2d(MaxPool2d):
    def _fwd(self, x):
        return ops.avg_pool2d_forward(x, self.kernel, self.stride, self.pad)

    def _bwd(self, dy, cache):
        return ops.avg_pool2d_backward(dy, cache)

    def __repr__(self):
        return f"AvgPool2d({self.kernel}, stride={self.stride}, pad={self.pad})"


class GlobalAvgPool2d(_Stateless):
    """(N, C, H, W) -> (N, C): avg_pool2d over the whole map, then flatten."""

    def _fwd(self, x):
        y, cache = ops.avg_pool2d_forward(x, x.shape[2:], 1, 0)
        return y.reshape(x.shape[0], x.shape[1]), (cache, y.shape)

    def _bwd(self, dy, cache):
        pool_cache, shape = cache
        return ops.avg_pool2d_backward(dy.reshape(shape), pool_cache)

    def __repr__(self):
        return "GlobalAvgPool2d()"


class Flatten(_Stateless):
    def _fwd(self, x):
        return x.reshape(x.shape[0], -1), x.shape

    def _bwd(self, dy, shape):
        return dy.reshape(shape)


class Identity(_Stateless):
    def _fwd(self, x):
        return x, None

    def _bwd(self, dy, cache):
        return dy


class Dropout(Layer):
    """Inverted dropout with its own seeded generator; identity in eval mode.

    The generator lives on the layer's device: ``to("gpu")`` replaces it with
    ``cupy.random.default_rng(seed)`` (a different bit generator: the masks on
    the GPU are not the CPU's), ``to("cpu")`` with NumPy's, both from
    ``seed``.  A forward on arrays of the other device is refused (one line)."""

    def __init__(self, p, seed=0):
        super().__init__()
        self.p = p
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._rng_device = "cpu"

    def _to_device(self, device):
        super()._to_device(device)
        if device != self._rng_device:
            self.rng = backend.default_rng(self.seed, device)
            self._rng_device = device

    def forward(self, x):
        if self.training and self.p > 0 and backend.device_of(x) != self._rng_device:
            raise ValueError(f"Dropout: the input is on the {backend.device_of(x)} but the "
                             f"generator on the {self._rng_device}; move the model with "
                             f".to({backend.device_of(x)!r})")
        y, self._cache = ops.dropout_forward(x, self.p, self.rng, self.training)
        return y

    def backward(self, dy):
        (dx,) = ops.dropout_backward(dy, self._cache)
        return dx

    def __repr__(self):
        return f"Dropout(p={self.p})"


def gradcheck_cases():
    """(label, layer, input) for ``tinynorm gradcheck``: the layers of this module
    that have a gradient (Dropout's mask is random; Flatten and Identity only
    reshape), float64, parameters moved off their starting values."""
    rng = np.random.default_rng(1)
    kw = dict(rng=rng, dtype=np.float64)
    x4 = rng.standard_normal((2, 3, 6, 6))
    x4[np.abs(x4) < 1e-3] = 0.5                      # away from ReLU's kink at 0
    cases = [
        ("layer Conv2d", Conv2d(3, 4, 3, 1, 1, **kw), x4),
        ("layer Conv2d stride 2, no bias", Conv2d(3, 4, 3, 2, 0, bias=False, **kw), x4),
        ("layer Linear", Linear(5, 4, **kw), rng.standard_normal((6, 5))),
        ("layer ReLU", ReLU(), x4),
        ("layer MaxPool2d 3/2 pad 1", MaxPool2d(3, 2, 1), x4),
        ("layer AvgPool2d 2", AvgPool2d(2), x4),
        ("layer GlobalAvgPool2d", GlobalAvgPool2d(), x4),
    ]
    for _, layer, _ in cases:
        for p in layer.params.values():
            p += 0.1 * rng.standard_normal(p.shape)
    return cases

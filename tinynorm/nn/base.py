"""The layer abstraction: parameters, gradients and state, addressed by name.

A layer owns

* ``params``  -- name -> array, the trainable parameters.  The optimizer
  updates them *in place*, so a layer must always read ``self.params[name]``
  (never keep a second reference to the array).
* ``grads``   -- name -> array, written by ``backward`` (overwritten, not
  accumulated: every layer is used once per forward pass).
* ``buffers`` -- name -> array, non-trainable state saved in checkpoints
  (BN running statistics).
* ``children`` -- name -> Layer, for composite layers.

``to(device)`` moves every parameter, gradient and buffer of the layer and
its descendants to "cpu" or "gpu" (layers with other device state, such as
Dropout's generator, extend ``_to_device``); a model is built on the host
(seeded NumPy init, the same numbers on every device) and moved as a whole.

``forward(x) -> y`` caches what ``backward(dy) -> dx`` needs.  ``train()`` and
``eval()`` switch the mode recursively.

A layer followed by a ReLU in a :class:`Sequential` may run the pair as one
forward (the ``fuse_relu`` setting, on by default): a class that sets
``fuses_relu = True`` in its own body (Conv2d, WNConv2d, BatchNorm) has a
``forward_relu(x)`` returning relu(forward(x)) -- the ReLU in place on
the layer's fresh output, or inside batch norm's channels-last normalizing
pass -- and the ReLU (a class setting ``takes_relu_output = True``:
``nn.ReLU``) adopts that result as its own output and cache.  The values,
the caches' contents, every backward and what the output hooks see are
those of the two separate forwards; only a second array and a pass over
memory are saved.  A layer whose own output is observed
(``track_output_norm``, a signal hook) is not fused.  In the backward
the ReLU writes its dx into the dy it is given when that dy is the new
array the next layer's backward returned (a class setting
``fresh_input_grad = True``: Conv2d, WNConv2d, BatchNorm, MaxPool2d), not
a gradient someone else also reads (a residual block's, or one passed
through an Identity or a reshape).  oneDNN's ReLU
post-op is not used: it maps a NaN pre-activation to 0, and a diverging
network must keep showing NaN.  Full names are dotted paths, e.g.
``"3.conv.v"``; ``named_parameters()`` walks them in a fixed order.
"""
from __future__ import annotations

import numpy as np

from .. import backend, settings
from ..backend import get_array_module

__all__ = ["Layer", "Sequential", "skip_input_grad"]


class Layer:
    # keys of params that receive weight decay (see tinynorm.optim.SGD)
    decay_keys: tuple = ("w", "v")

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.children: dict = {}
        self.training = True
        # set by the trainer to record ||output||_2 after every forward (Figure 4)
        self.track_output_norm = False
        self.output_norm = float("nan")

    # -- computation ---------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self._observed(self.forward(x))

    def _is_observed(self) -> bool:
        return self.track_output_norm or getattr(self, "_signal_hook", None) is not None

    def _observed(self, y):
        """What ``__call__`` does with a forward's output: the output norm
        (``track_output_norm``) and the signal hook; returns y."""
        if self.track_output_norm:
            xp = get_array_module(y)
            self.output_norm = float(xp.sqrt((y.astype(xp.float64) ** 2).sum()))
        # set by tinynorm.diagnostics.SignalRecorder on conv-unit and block outputs
        hook = getattr(self, "_signal_hook", None)
        if hook is not None:
            recorder, name, kind = hook
            recorder.record(name, kind, y)
        return y

    # -- modes -----------------------------------------------------------------
    def train(self, mode: bool = True):
        self.training = mode
        for child in self.children.values():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- device ----------------------------------------------------------------
    def to(self, device: str):
        """Move this layer and every descendant to ``device`` ("cpu" / "gpu");
        returns self.  A DeviceError (one line) when the device is not usable.
        Arrays already there are kept (no copy); cached forward state is dropped."""
        device = backend.check_device(device)
        for _, layer in self.named_layers():
            layer._to_device(device)
        return self

    def _to_device(self, device):
        # this layer only (``to`` walks the tree)
        for store in (self.params, self.grads, self.buffers):
            for key, arr in store.items():
                if arr is not None:
                    store[key] = backend.to_device(arr, device)
        if hasattr(self, "_cache"):
            self._cache = None

    @property
    def device(self) -> str:
        """"gpu" when this layer's (or its first descendant's) arrays are CuPy
        arrays, "cpu" otherwise (also for a layer without arrays)."""
        for _, layer in self.named_layers():
            for store in (layer.params, layer.buffers):
                for arr in store.values():
                    return backend.device_of(arr)
        return "cpu"

    # -- naming ----------------------------------------------------------------
    def named_layers(self, prefix: str = ""):
        """Yield ``(dotted_name, layer)`` for this layer and every descendant."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        """Yield ``(full_name, layer, key)`` for every trainable parameter."""
        for lname, layer in self.named_layers():
            for key in layer.params:
                yield (f"{lname}.{key}" if lname else key), layer, key

    def parameters(self) -> dict:
        return {name: layer.params[key] for name, layer, key in self.named_parameters()}

    def gradients(self) -> dict:
        return {name: layer.grads.get(key) for name, layer, key in self.named_parameters()}

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters().values()))

    def state_dict(self) -> dict:
        """Parameters and buffers by full name (``buffer:`` names for buffers)."""
        state = dict(self.parameters())
        for lname, layer in self.named_layers():
            for key, buf in layer.buffers.items():
                state[f"{lname}.{key}" if lname else key] = buf
        return state

    def load_state_dict(self, state: dict):
        """Copy arrays into the existing parameters and buffers, checking shapes."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        for name, arr in own.items():
            src = state[name]
            if tuple(src.shape) != tuple(arr.shape):
                raise ValueError(f"'{name}': checkpoint shape {tuple(src.shape)} != model "
                                 f"shape {tuple(arr.shape)}")
            xp = get_array_module(arr)
            arr[...] = xp.asarray(src, dtype=arr.dtype)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Sequential(Layer):
    """Layers applied in order; children are named "0", "1", ... unless given names."""

    def __init__(self, *layers, names=None):
        super().__init__()
        names = names or [str(i) for i in range(len(layers))]
        for name, layer in zip(names, layers):
            self.children[name] = layer

    @property
    def layers(self):
        return list(self.children.values())

    def forward(self, x):
        layers = list(self.children.values())
        fuse = settings.get("fuse_relu")
        i = 0
        while i < len(layers):
            layer = layers[i]
            if fuse and i + 1 < len(layers) and _fusable(layer, layers[i + 1]):
                x = layers[i + 1].adopt_relu_output(layer.forward_relu(x))
                i += 2
            else:
                x = layer(x)
                i += 1
        return x

    def backward(self, dy):
        layers = list(self.children.values())
        fuse = settings.get("fuse_relu")
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            if fuse and i + 1 < len(layers) and _writes_into_dy(layer, layers[i + 1]):
                dy = layer.backward_inplace(dy)
            else:
                dy = layer.backward(dy)
        return dy

    def __repr__(self):
        inner = "\n".join(f"  ({n}): {l!r}".replace("\n", "\n  ") for n, l in self.children.items())
        return f"Sequential(\n{inner}\n)"


def skip_input_grad(model):
    """Let ``model``'s first layer skip the gradient of the network's input,
    which training never uses: the layer reached through first children of
    Sequentials (so that nothing else reads that input), if it has an
    ``input_grad`` switch (Conv2d, WNConv2d: backward then computes the
    weight gradients only, and ``model.backward`` returns None).  Returns
    that layer, or None where there is none.  The trainer calls it; the
    gradients of every parameter are unchanged."""
    layer = model
    while isinstance(layer, Sequential) and layer.children:
        layer = next(iter(layer.children.values()))
    if layer is model or not hasattr(layer, "input_grad"):
        return None
    layer.input_grad = False
    return layer


def _fusable(layer, nxt) -> bool:
    """``layer`` then ``nxt`` may run as ``layer.forward_relu`` (see the module
    docstring): both classes declare it in their own bodies (a subclass that
    may have changed forward does not inherit it), and nothing observes
    ``layer``'s output."""
    return (type(layer).__dict__.get("fuses_relu", False)
            and type(nxt).__dict__.get("takes_relu_output", False)
            and not layer._is_observed())


def _writes_into_dy(layer, nxt) -> bool:
    """``layer`` (a ReLU) may write its dx into the dy it gets: that dy is what
    ``nxt``'s backward returned, a new array no one else holds (both classes
    declare it in their own bodies)."""
    return (type(layer).__dict__.get("takes_relu_output", False)
            and type(nxt).__dict__.get("fresh_input_grad", False))


def _as_pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)

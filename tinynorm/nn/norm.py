"""Normalization layers built on the ops in ``tinynorm.ops``.

Batch statistics
    BatchNorm          BN with gamma/beta, running statistics, optional per-chunk
                       ("ghost") statistics
    MeanOnlyBatchNorm  Salimans & Kingma's companion to WN (no gamma, no variance)
    BatchRenorm        Ioffe (2017)
Per-sample statistics (training == evaluation)
    LayerNorm, GroupNorm (instance norm: ``groups=num_channels``)
Weight normalization (paper section 3.2)
    WNConv2d, WNLinear   w = g v / (||v|| + eps), bias b (g starts at 1)
                         (``norm_scale``: NormProp's 1.21; ``gain=False``: TReLU WN)
    NormPropReLU, TReLU, ScaleShift   the activation / output layers of the WN family
    data_dependent_init(model, x)     Salimans & Kingma's initialization

The NormProp and TReLU WN units are compositions of these layers, written once,
in the normalization registry (:mod:`tinynorm.norms`): the models build them from
there and ``tinynorm gradcheck`` checks them from there.

Running-statistic convention (BatchNorm, MeanOnlyBatchNorm, BatchRenorm):
``running = (1 - momentum) * running + momentum * batch_statistic`` with
``momentum = 0.1`` by default (PyTorch's convention; TensorFlow's ``decay=0.9``
is the same update).  The running variance is the *unbiased* one: the batch's
biased variance times m / (m - 1), m = values per statistic (N*H*W, or k*H*W
per chunk), as in Chainer and PyTorch.  With chunks the batch statistic is
the mean over chunks of the per-chunk statistics (what averaging the running
statistics of the paper's 4 GPUs would give).

Weight decay: ``Layer.decay_keys = ("w", "v")`` -- in WN layers the direction
v decays; g, b, gamma, beta and alpha do not.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_array_module
from .base import Layer, _as_pair
from .init import DEFAULT_INIT, initialize

__all__ = ["BatchNorm", "MeanOnlyBatchNorm", "BatchRenorm", "LayerNorm", "GroupNorm",
           "WNConv2d", "WNLinear", "NormPropReLU", "TReLU", "ScaleShift", "data_dependent_init", "WN_EPS", "WN_G_INITS"]

# Added to ||v||; only guards the division (for ||v|| ~ 0.1-1 it vanishes in
# float32).  Paper section 3.2 writes the same eps in ||W_j||_F + eps.
WN_EPS = 1e-8

# How a WN layer's gain g starts (``wn_g_init`` in a run's configuration):
#   "one"  -- g = 1: unit-norm filters whatever v's init; the paper's gamma, "a
#             scale like BN's", and BN's gamma starts at 1 (the default);
#   "norm" -- g = ||v||: w = v at the start, so the first-order WN update of w
#             equals plain SGD's (tinynorm's default before caffe_xavier);
#   "frozen" -- g fixed at 1, not learned: w = v / ||v|| (a layer without the
#             gain parameter; the linear study's control for what g does).
# A number sets every g to it.  Salimans & Kingma's data-dependent init is
# separate (``data_dependent_init``, the trainer's ``ddi``).
WN_G_INITS = ("one", "norm", "frozen")


def _update_running(running, batch_stat, momentum):
    xp = get_array_module(running)
    running *= (1.0 - momentum)
    running += xp.asarray(momentum * batch_stat, dtype=running.dtype)


def _unbiased_factor(m):
    # m / (m - 1) turns the biased batch variance into the unbiased estimate;
    # undefined for m = 1 (a 1-value chunk, whose variance is 0): use 1 there.
    return m / (m - 1) if m > 1 else 1.0


class BatchNorm(Layer):
    """Batch normalization (Ioffe & Szegedy 2015), paper section 3.1.

    Training: y = gamma (x - mean_B) / sqrt(var_B + eps) + beta with batch (or
    per-chunk) statistics, then the running statistics are updated (see the
    module docstring: momentum 0.1, unbiased running variance).  Evaluation:
    the same map with running_mean / running_var.

    Parameters
    ----------
    num_channels : C for (N, C, H, W) input, D for (N, D)
    eps : added to the variance (1e-5; cuDNN requires eps >= 1e-5)
    momentum : weight of the new batch statistic in the running average
    chunk : None or k -- statistics per consecutive chunk of k samples
        (the paper's ResNet-50: batch 256 on 4 GPUs, k = 64).  The training
        batch must be divisible by k; evaluation ignores chunk.
    affine : learn gamma (start 1) and beta (start 0)

    params ``gamma``, ``beta`` (C,);  buffers ``running_mean`` (start 0),
    ``running_var`` (start 1), (C,).
    """

    def __init__(self, num_channels, eps=1e-5, momentum=0.1, chunk=None, affine=True, *,
                 rng=None, dtype=np.float32):
        super().__init__()
        self.num_channels, self.eps, self.momentum, self.chunk = num_channels, eps, momentum, chunk
        self.affine = affine
        if affine:
            self.params["gamma"] = np.ones(num_channels, dtype)
            self.params["beta"] = np.zeros(num_channels, dtype)
        self.buffers["running_mean"] = np.zeros(num_channels, dtype)
        self.buffers["running_var"] = np.ones(num_channels, dtype)
        self._cache = None

    fuses_relu = True   # forward_relu: see tinynorm.nn.base
    fresh_input_grad = True   # backward returns a new dx (tinynorm.nn.base)

    def forward_relu(self, x):
        """relu(forward(x)): in training mode the channels-last kernels apply
        the ReLU as they normalize, elsewhere it runs in place on the fresh
        output (the caches hold x or x_hat, never y)."""
        if not self.training:
            return ops.relu_inplace(self.forward(x))
        return self._forward(x, relu=True)

    def forward(self, x):
        return self._forward(x)

    def _forward(self, x, relu=False):
        gamma, beta = self.params.get("gamma"), self.params.get("beta")
        if self.training:
            fwd = ops.batch_norm_relu_forward if relu else ops.batch_norm_forward
            y, cache = fwd(x, gamma, beta, self.eps, self.chunk)
            _update_running(self.buffers["running_mean"], cache.batch_mean, self.momentum)
            _update_running(self.buffers["running_var"],
                            cache.batch_var * _unbiased_factor(cache.count), self.momentum)
            self._cache = ("train", cache)
        else:
            y, cache = ops.batch_norm_inference_forward(
                x, gamma, beta, self.buffers["running_mean"], self.buffers["running_var"],
                self.eps)
            self._cache = ("eval", cache)
        return y

    # the train-mode backward op (BatchRenorm swaps in its own)
    _train_backward = staticmethod(ops.batch_norm_backward)

    def backward(self, dy):
        mode, cache = self._cache
        if mode == "train":
            dx, dgamma, dbeta = self._train_backward(dy, cache)
        else:
            dx, dgamma, dbeta = ops.batch_norm_inference_backward(dy, cache)
        if self.affine:
            self.grads["gamma"], self.grads["beta"] = dgamma, dbeta
        self._cache = None
        return dx

    def __repr__(self):
        return (f"BatchNorm({self.num_channels}, eps={self.eps}, momentum={self.momentum}, "
                f"chunk={self.chunk}, affine={self.affine})")


class MeanOnlyBatchNorm(Layer):
    """y = x - mean_B(x) + beta (Salimans & Kingma 2016); no gamma, no variance.

    Meant after a WN layer (whose g is the scale).  Evaluation subtracts
    ``running_mean`` instead (momentum convention as BatchNorm).

    params ``beta`` (C,) (if bias);  buffers ``running_mean`` (C,).
    """

    def __init__(self, num_channels, momentum=0.1, chunk=None, bias=True, *, rng=None,
                 dtype=np.float32):
        super().__init__()
        self.num_channels, self.momentum, self.chunk = num_channels, momentum, chunk
        if bias:
            self.params["beta"] = np.zeros(num_channels, dtype)
        self.buffers["running_mean"] = np.zeros(num_channels, dtype)
        self._cache = None

    def forward(self, x):
        beta = self.params.get("beta")
        if self.training:
            y, cache = ops.mean_only_batch_norm_forward(x, beta, self.chunk)
            _update_running(self.buffers["running_mean"], cache.batch_mean, self.momentum)
            self._cache = ("train", cache)
        else:
            # y = x + (beta - running_mean): a per-channel shift, d/dbeta = sum dy
            rm = self.buffers["running_mean"]
            shift = -rm if beta is None else beta - rm.astype(beta.dtype)
            y, cache = ops.scale_shift_forward(x, None, shift)
            self._cache = ("eval", cache)
        return y

    def backward(self, dy):
        mode, cache = self._cache
        if mode == "train":
            dx, dbeta = ops.mean_only_batch_norm_backward(dy, cache)
        else:
            dx, _, dbeta = ops.scale_shift_backward(dy, cache)
        if "beta" in self.params:
            self.grads["beta"] = dbeta.astype(self.params["beta"].dtype)
        self._cache = None
        return dx

    def __repr__(self):
        return f"MeanOnlyBatchNorm({self.num_channels}, momentum={self.momentum}, chunk={self.chunk})"


class BatchRenorm(Layer):
    """Batch renormalization (Ioffe 2017).

    Training: y = gamma (r (x - mean_B) / sigma_B + d) + beta with
    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mean_B - mu) / sigma,
    -d_max, d_max) computed from the running statistics *before* this batch's
    update; r and d get no gradient.  Then the running statistics are updated
    as in BatchNorm.  Evaluation: the eval-mode BN map with running statistics.

    Ioffe ramps r_max from 1 to 3 and d_max from 0 to 5 over training; assign
    ``layer.r_max`` / ``layer.d_max`` from a schedule to do that (r_max = 1,
    d_max = 0 is plain BN).

    params ``gamma``, ``beta``;  buffers ``running_mean``, ``running_var``.
    """

    def __init__(self, num_channels, eps=1e-5, momentum=0.1, r_max=3.0, d_max=5.0,
                 affine=True, *, rng=None, dtype=np.float32):
        super().__init__()
        self.num_channels, self.eps, self.momentum = num_channels, eps, momentum
        self.r_max, self.d_max, self.affine = r_max, d_max, affine
        if affine:
            self.params["gamma"] = np.ones(num_channels, dtype)
            self.params["beta"] = np.zeros(num_channels, dtype)
        self.buffers["running_mean"] = np.zeros(num_channels, dtype)
        self.buffers["running_var"] = np.ones(num_channels, dtype)
        self._cache = None

    def forward(self, x):
        gamma, beta = self.params.get("gamma"), self.params.get("beta")
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        if self.training:
            y, cache = ops.batch_renorm_forward(x, gamma, beta, rm, rv, self.eps,
                                                self.r_max, self.d_max)
            _update_running(rm, cache.batch_mean, self.momentum)
            _update_running(rv, cache.batch_var * _unbiased_factor(cache.count), self.momentum)
            self._cache = ("train", cache)
        else:
            y, cache = ops.batch_norm_inference_forward(x, gamma, beta, rm, rv, self.eps)
            self._cache = ("eval", cache)
        return y

    _train_backward = staticmethod(ops.batch_renorm_backward)
    backward = BatchNorm.backward

    def __repr__(self):
        return (f"BatchRenorm({self.num_channels}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max})")


class GroupNorm(Layer):
    """Group normalization; ``groups=1`` is layer norm, ``groups=num_channels``
    instance norm.  No batch statistics: train and eval are the same.

    params ``gamma`` (start 1), ``beta`` (start 0), (C,), if affine.
    """

    def __init__(self, num_channels, groups, eps=1e-5, affine=True, *, rng=None,
                 dtype=np.float32):
        super().__init__()
        if num_channels % groups:
            raise ValueError(f"GroupNorm: {num_channels} channels cannot be split into "
                             f"{groups} groups")
        self.num_channels, self.groups, self.eps, self.affine = num_channels, groups, eps, affine
        if affine:
            self.params["gamma"] = np.ones(num_channels, dtype)
            self.params["beta"] = np.zeros(num_channels, dtype)
        self._cache = None

    def forward(self, x):
        y, self._cache = ops.group_norm_forward(x, self.params.get("gamma"),
                                                self.params.get("beta"), self.groups, self.eps)
        return y

    def backward(self, dy):
        dx, dgamma, dbeta = ops.group_norm_backward(dy, self._cache)
        if self.affine:
            self.grads["gamma"], self.grads["beta"] = dgamma, dbeta
        self._cache = None
        return dx

    def __repr__(self):
        return f"GroupNorm({self.num_channels}, groups={self.groups}, eps={self.eps})"


class LayerNorm(GroupNorm):
    """Layer normalization over all axes but the batch; per-channel gamma/beta."""

    def __init__(self, num_channels, eps=1e-5, affine=True, *, rng=None, dtype=np.float32):
        super().__init__(num_channels, 1, eps, affine, rng=rng, dtype=dtype)

    def __repr__(self):
        return f"LayerNorm({self.num_channels}, eps={self.eps})"


# -- weight normalization --------------------------------------------------------

class _WNLayer(Layer):
    """Shared machinery of WNConv2d / WNLinear: params v, g, b; weight norm
    computed once per forward; data-dependent init when ``_ddi_pending``."""

    def _init_params(self, shape, gain, bias, g_init, eps, rng, init, dtype, norm_scale=1.0):
        rng = rng if rng is not None else np.random.default_rng(0)
        if not norm_scale > 0:
            raise ValueError(f"norm_scale must be > 0, got {norm_scale}")
        self.eps, self.norm_scale = eps, float(norm_scale)
        self.params["v"] = initialize(init, shape, rng, dtype)
        if gain and g_init != "frozen":
            if g_init == "norm":
                # g = s ||v||: w = v at the start (WN starts from the init's weights)
                axes = tuple(range(1, len(shape)))
                g0 = self.norm_scale * (np.sqrt(
                    (self.params["v"].astype(np.float64) ** 2).sum(axis=axes)) + eps)
            elif g_init == "one":
                g0 = np.ones(shape[0])
            elif isinstance(g_init, (int, float)) and not isinstance(g_init, bool):
                g0 = np.full(shape[0], float(g_init))
            else:
                raise ValueError(f"unknown g_init {g_init!r}; choose 'one', 'norm', 'frozen' or a number")
            self.params["g"] = g0.astype(dtype)
        if bias:
            self.params["b"] = np.zeros(shape[0], dtype)
        self._ddi_pending = False
        self._cache = None

    # subclasses: y, cache = self._apply(x, w, b)  and  dx, dw, db = self._unapply(dy, cache)
    def _apply(self, x, w, b):
        raise NotImplementedError

    def _unapply(self, dy, cache):
        raise NotImplementedError

    def forward(self, x):
        if self._ddi_pending:
            self._data_dependent_init(x)
        w, wn_cache = ops.weight_norm_forward(self.params["v"], self.params.get("g"), self.eps,
                                              self.norm_scale)
        y, cache = self._apply(x, w, self.params.get("b"))
        self._cache = (wn_cache, cache)
        return y

    def backward(self, dy):
        wn_cache, cache = self._cache
        dx, dw, db = self._unapply(dy, cache)
        dv, dg = ops.weight_norm_backward(dw, wn_cache)
        self.grads["v"] = dv
        if "g" in self.params:
            self.grads["g"] = dg
        if "b" in self.params:
            self.grads["b"] = db
        self._cache = None
        return dx

    def _data_dependent_init(self, x):
        """Salimans & Kingma (2016), section 2.2: with t = conv(x, v / (s ||v||)),
        per output channel mean mu and std sigma over (N, H, W), set
        g = 1 / sigma and b = -mu / sigma, so that g t + b has zero mean and unit
        variance on this batch.  Without a gain only b = -mu is set; without a
        bias only g = 1 / sigma."""
        xp = get_array_module(x)
        w_unit, _ = ops.weight_norm_forward(self.params["v"], None, self.eps, self.norm_scale)
        t, _ = self._apply(x, w_unit, None)
        axes = (0,) + tuple(range(2, t.ndim))
        mean = t.mean(axis=axes, dtype=xp.float64)
        var = ((t - mean.reshape((1, -1) + (1,) * (t.ndim - 2)).astype(t.dtype)) ** 2).mean(
            axis=axes, dtype=xp.float64)
        # 1e-10 guards a channel that is constant on this batch (e.g. dead inputs)
        inv_sigma = 1.0 / xp.sqrt(var + 1e-10)
        if "g" in self.params:
            self.params["g"][...] = inv_sigma.astype(self.params["g"].dtype)
            shift = -mean * inv_sigma
        else:
            shift = -mean
        if "b" in self.params:
            self.params["b"][...] = shift.astype(self.params["b"].dtype)
        self._ddi_pending = False


class WNConv2d(_WNLayer):
    """Weight-normalized convolution, paper section 3.2:

        o_j = g_j (v_j * x) / (||v_j||_F + eps) + b_j

    Parameters
    ----------
    c_in, c_out, kernel, stride, pad : as Conv2d
    gain : learn g (C_out,); False gives w = v / (||v|| + eps) (TReLU WN)
    bias : learn b (C_out,), start 0
    g_init : "one" (default; unit-norm filters), "norm" (g = ||v||, so w = v
        starts as the init's weights), "frozen" (no g: fixed at 1) or a number
        (see ``WN_G_INITS``)
    eps : added to ||v|| (``WN_EPS``)
    norm_scale : s in w = g v / (s (||v|| + eps)); 1.21 in NormProp's units

    params ``v`` (C_out, C_in, kh, kw) (``init``, weight-decayed), ``g``, ``b``.
    """

    def __init__(self, c_in, c_out, kernel, stride=1, pad=0, gain=True, bias=True, *,
                 g_init="one", eps=WN_EPS, norm_scale=1.0, rng=None, init=DEFAULT_INIT,
                 dtype=np.float32):
        super().__init__()
        kh, kw = _as_pair(kernel)
        self.stride, self.pad = stride, pad
        self._init_params((c_out, c_in, kh, kw), gain, bias, g_init, eps, rng, init, dtype,
                          norm_scale)

    fuses_relu = True   # forward_relu: see tinynorm.nn.base
    fresh_input_grad = True   # backward returns a new dx (tinynorm.nn.base)
    input_grad = True   # as Conv2d's (tinynorm.nn.skip_input_grad)

    def _apply(self, x, w, b):
        return ops.conv2d_forward(x, w, b, self.stride, self.pad)

    def forward_relu(self, x):
        """relu(forward(x)): the ReLU in place on the fresh output (the
        caches hold x and the weights, never y)."""
        return ops.relu_inplace(self.forward(x))

    def _unapply(self, dy, cache):
        if self.input_grad:
            return ops.conv2d_backward(dy, cache)
        return (None, *ops.conv2d_backward_filter(dy, cache))

    def __repr__(self):
        co, ci, kh, kw = self.params["v"].shape
        scale = f", norm_scale={self.norm_scale:g}" if self.norm_scale != 1.0 else ""
        return (f"WNConv2d({ci}, {co}, {kh}x{kw}, stride={self.stride}, pad={self.pad}, "
                f"gain={'g' in self.params}, bias={'b' in self.params}{scale})")


class WNLinear(_WNLayer):
    """Weight-normalized linear layer: o_j = g_j (v_j . x) / (||v_j|| + eps) + b_j.

    params ``v`` (D_out, D_in), ``g`` (D_out,) if gain, ``b`` (D_out,) if bias;
    other arguments as WNConv2d.
    """

    def __init__(self, d_in, d_out, gain=True, bias=True, *, g_init="one", eps=WN_EPS,
                 norm_scale=1.0, rng=None, init=DEFAULT_INIT, dtype=np.float32):
        super().__init__()
        self._init_params((d_out, d_in), gain, bias, g_init, eps, rng, init, dtype, norm_scale)

    def _apply(self, x, w, b):
        return ops.linear_forward(x, w, b)

    def _unapply(self, dy, cache):
        return ops.linear_backward(dy, cache)

    def __repr__(self):
        do, di = self.params["v"].shape
        scale = f", norm_scale={self.norm_scale:g}" if self.norm_scale != 1.0 else ""
        return (f"WNLinear({di}, {do}, gain={'g' in self.params}, bias={'b' in self.params}"
                f"{scale})")


def data_dependent_init(model, x):
    """Salimans & Kingma's data-dependent initialization of every WN layer.

    Flags every WNConv2d / WNLinear in ``model`` (including those inside
    NormPropConv2d / TReLUConv2d), runs ``model.forward(x)`` once in train
    mode, and lets each flagged layer set g = 1/sigma, b = -mu/sigma from its
    own pre-activation statistics on this batch before computing its output
    (layers are initialized in order, each seeing the already-initialized
    layers before it).  Batch-statistic layers in the model update their
    running statistics once.  Returns the model's output on ``x``.

    Raises ValueError when the model has no WN layer and RuntimeError when a WN
    layer was not reached by the forward pass.
    """
    wn_layers = [(name, layer) for name, layer in model.named_layers()
                 if isinstance(layer, _WNLayer)]
    if not wn_layers:
        raise ValueError("data_dependent_init: the model has no WNConv2d / WNLinear layer")
    for _, layer in wn_layers:
        layer._ddi_pending = True
    was_training = model.training
    model.train()
    try:
        y = model.forward(x)
    finally:
        model.train(was_training)
        missed = [name for name, layer in wn_layers if layer._ddi_pending]
        for _, layer in wn_layers:
            layer._ddi_pending = False
    if missed:
        raise RuntimeError(f"data_dependent_init: the forward pass did not reach WN layer(s) "
                           f"{missed}")
    return y


# -- activations and output layers of the WN family ------------------------------

class NormPropReLU(Layer):
    """y = c1 (relu(z) - c0), c0 = sqrt(1/(2 pi)), c1 = 1/sqrt(0.5 (1 - 1/pi))."""

    def forward(self, x):
        y, self._cache = ops.normprop_relu_forward(x)
        return y

    def backward(self, dy):
        (dx,) = ops.normprop_relu_backward(dy, self._cache)
        self._cache = None
        return dx

    def __repr__(self):
        return "NormPropReLU()"


class TReLU(Layer):
    """y = relu(x - alpha) + alpha, alpha per channel (axis 1), learnable, start 0.

    params ``alpha`` (C,).
    """

    def __init__(self, num_channels, *, rng=None, dtype=np.float32):
        super().__init__()
        self.num_channels = num_channels
        self.params["alpha"] = np.zeros(num_channels, dtype)

    def forward(self, x):
        y, self._cache = ops.trelu_forward(x, self.params["alpha"])
        return y

    def backward(self, dy):
        dx, self.grads["alpha"] = ops.trelu_backward(dy, self._cache)
        self._cache = None
        return dx

    def __repr__(self):
        return f"TReLU({self.num_channels})"


class ScaleShift(Layer):
    """y = gamma * x + beta per channel (axis 1): the TReLU WN network's last layer.

    params ``gamma`` (start 1), ``beta`` (start 0), (C,).
    """

    def __init__(self, num_channels, *, rng=None, dtype=np.float32):
        super().__init__()
        self.num_channels = num_channels
        self.params["gamma"] = np.ones(num_channels, dtype)
        self.params["beta"] = np.zeros(num_channels, dtype)

    def forward(self, x):
        y, self._cache = ops.scale_shift_forward(x, self.params["gamma"], self.params["beta"])
        return y

    def backward(self, dy):
        dx, self.grads["gamma"], self.grads["beta"] = ops.scale_shift_backward(dy, self._cache)
        self._cache = None
        return dx

    def __repr__(self):
        return f"ScaleShift({self.num_channels})"


def gradcheck_cases():
    """(label, layer, input) for ``tinynorm gradcheck``: the layers of this module,
    float64, train mode, parameters moved off their starting values (gamma = 1,
    beta = alpha = 0 would hide mistakes)."""
    rng = np.random.default_rng(0)
    kw = dict(rng=rng, dtype=np.float64)
    x4 = rng.standard_normal((4, 3, 5, 5))
    x2 = rng.standard_normal((6, 5))
    # momentum 0 keeps the running statistics (and so r and d) fixed between the
    # forward passes of the finite differences; they are set so r and d clip in
    # every channel (unclipped, r and d depend on x but carry no gradient by design)
    renorm = BatchRenorm(3, momentum=0.0, r_max=1.2, d_max=0.1, dtype=np.float64)
    renorm.buffers["running_mean"][...] = [0.3, -0.2, 1.0]
    renorm.buffers["running_var"][...] = [2.0, 0.5, 4.0]
    z4 = x4.copy()
    z4[np.abs(z4) < 1e-3] = 0.5                      # away from the kinks at 0 (alpha = 0)
    cases = [
        ("layer BatchNorm", BatchNorm(3, dtype=np.float64), x4),
        ("layer BatchNorm chunk=2", BatchNorm(3, chunk=2, dtype=np.float64), x4),
        ("layer MeanOnlyBatchNorm", MeanOnlyBatchNorm(3, dtype=np.float64), x4),
        ("layer BatchRenorm (r, d clipped)", renorm, x4),
        ("layer GroupNorm G=3", GroupNorm(3, 3, dtype=np.float64), x4),
        ("layer LayerNorm", LayerNorm(3, dtype=np.float64), x4),
        ("layer WNConv2d", WNConv2d(3, 4, 3, 1, 1, **kw), x4),
        ("layer WNConv2d g_init=norm", WNConv2d(3, 4, 3, 1, 1, g_init="norm", **kw), x4),
        ("layer WNConv2d norm_scale=1.21", WNConv2d(3, 4, 3, 1, 1, norm_scale=1.21, **kw), x4),
        ("layer WNConv2d gain=False stride 2", WNConv2d(3, 4, 3, 2, 0, gain=False, **kw), x4),
        ("layer WNLinear", WNLinear(5, 4, **kw), x2),
        ("layer WNLinear norm_scale=1.21", WNLinear(5, 4, norm_scale=1.21, **kw), x2),
        ("layer NormPropReLU", NormPropReLU(), z4),
        ("layer TReLU", TReLU(3, dtype=np.float64), z4),
        ("layer ScaleShift", ScaleShift(3, dtype=np.float64), x4),
    ]
    for _, layer, _ in cases:
        for key, p in layer.params.items():
            p += 0.1 * rng.standard_normal(p.shape)
    # TReLU: alpha moved off 0, so the input is moved off the kink x = alpha again
    alpha = cases[-2][1].params["alpha"][None, :, None, None]
    cases[-2] = (cases[-2][0], cases[-2][1], np.where(np.abs(z4 - alpha) < 1e-3, z4 + 0.1, z4))
    return cases

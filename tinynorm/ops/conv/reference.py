"""The slow, obviously correct direct convolution that the tests hold every
plan equal to: a loop over the kh*kw kernel offsets of tensor contractions,
array-generic (NumPy or CuPy)."""
from __future__ import annotations

from ... import backend
from .args import check_args

__all__ = ["conv2d_reference_forward", "conv2d_reference_backward"]


def conv2d_reference_forward(x, w, b=None, stride=1, pad=0):
    """Direct convolution, one tensor contraction per kernel offset (slow; tests).

    y[n, o] = b[o] + sum_{i, j} sum_c w[o, c, i, j] * x_pad[n, c, i::sh, j::sw]
    (window of OH x OW).  Same arguments, shapes and cache contract as
    :func:`tinynorm.ops.conv2d_forward`.
    """
    xp, (kh, kw), (sh, sw), (ph, pw), (oh, ow) = check_args(x, w, b, stride, pad)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = xp.zeros((x.shape[0], w.shape[0], oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x_pad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            y += xp.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y, (x, w, b is not None, (kh, kw), (sh, sw), (ph, pw))


def conv2d_reference_backward(dy, cache):
    """Direct backward, one contraction per kernel offset (slow; tests).

    For each offset (i, j), with patch = x_pad[:, :, i::sh, j::sw] (OH x OW)::

        dw[:, :, i, j]            = sum_{n,oy,ox} dy[n, o] * patch[n, c]
        dx_pad[:, :, i::sh, j::sw] += sum_o dy[n, o] * w[o, c, i, j]
        db                        = sum_{n,oy,ox} dy
    """
    x, w, has_bias, (kh, kw), (sh, sw), (ph, pw) = cache
    xp = backend.get_array_module(x)
    n, c, h, v = x.shape
    oh, ow = dy.shape[2:]
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dx_pad = xp.zeros_like(x_pad)
    dw = xp.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                      slice(j, j + sw * (ow - 1) + 1, sw))
            dw[:, :, i, j] = xp.einsum("nohw,nchw->oc", dy, x_pad[window])
            dx_pad[window] += xp.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    dx = xp.ascontiguousarray(dx_pad[:, :, ph:ph + h, pw:pw + v])
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db

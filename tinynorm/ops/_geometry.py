"""Window geometry shared by convolution and pooling: output sizes, argument
checks, and the im2col / col2im layout transforms.

Layout used everywhere in tinynorm (Chainer's and Caffe's "col" buffer, with
the batch folded into the column index so that one GEMM covers the batch)::

    col[(c, i, j), (n, oy, ox)] = x_pad[n, c, oy*sh + i, ox*sw + j]
    shape (C*kh*kw, N*OH*OW), row index r = (c*kh + i)*kw + j,
    column index q = (n*OH + oy)*OW + ox,

where ``x_pad`` is ``x`` zero-padded by ``ph`` rows and ``pw`` columns on each
side.  ``col2im`` is the adjoint (transpose) of ``im2col``: it sums every column
entry back onto the input pixel it was copied from, which is exactly the
input gradient of ``im2col``.

Two implementations of each transform:

* ``im2col_reference`` / ``col2im_reference``: array-generic (NumPy or CuPy),
  a Python loop over the kh*kw kernel offsets with strided slices.  Used on the
  GPU when cuDNN is missing and by the tests as the obviously-correct version.
* ``im2col`` / ``col2im``: numba ``parallel=True`` kernels for C-contiguous
  float32/float64 NumPy arrays, one ``prange`` over the N*C input planes (each
  iteration reads one plane, which stays in L1/L2, and writes kh*kw contiguous
  runs of OH*OW entries; in col2im each iteration owns its plane, so there are
  no write races).  They fall back to the reference for other arrays.

The kernels start through :func:`tinynorm.ops._kernels.launch`, like every
numba kernel of the ops.
"""
from __future__ import annotations

import numbers

import numpy as np
from numba import njit, prange, uint64

from .. import backend
from ._kernels import fast_ok, launch, serial_twin

__all__ = [
    "pair", "conv_outsize", "window_geometry", "im2col", "col2im",
    "im2col_reference", "col2im_reference",
]

def pair(value, name: str, op: str, *, minimum: int):
    """``value`` as an ``(h, w)`` tuple of ints, each ``>= minimum``.

    Accepts an int or a length-2 sequence of ints; raises ``ValueError``
    naming ``op`` and ``name`` otherwise.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        hw = (int(value), int(value))
    else:
        try:
            hw = tuple(value)
        except TypeError:
            raise ValueError(f"{op}: {name} must be an int or an (h, w) pair of ints; "
                             f"got {value!r}") from None
        if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   for v in hw):
            raise ValueError(f"{op}: {name} must be an int or an (h, w) pair of ints; "
                             f"got {value!r}")
        hw = (int(hw[0]), int(hw[1]))
    if min(hw) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}; got {value!r}")
    return hw


def conv_outsize(size: int, k: int, s: int, p: int) -> int:
    """Output length of a window of ``k`` sliding with stride ``s`` over
    ``size`` input positions padded by ``p`` on each side (floor mode)."""
    return (size + 2 * p - k) // s + 1


def window_geometry(op: str, x_shape, kernel, stride, pad):
    """Check a sliding-window configuration and return its output size.

    x_shape : (N, C, H, W)
    kernel, stride, pad : (h, w) int pairs (already validated by :func:`pair`)

    Returns ``(OH, OW)``.  Raises ``ValueError`` naming ``op`` when the kernel
    is larger than the padded input.
    """
    _, _, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(
            f"{op}: kernel {kh}x{kw} is larger than the padded input "
            f"{h + 2 * ph}x{w + 2 * pw} (input {h}x{w}, pad {ph},{pw})")
    return conv_outsize(h, kh, sh, ph), conv_outsize(w, kw, sw, pw)


# ----------------------------------------------------------------------------
# Reference transforms (array-generic, loop over kernel offsets only)
# ----------------------------------------------------------------------------

def im2col_reference(x, kernel, stride, pad):
    """x (N, C, H, W) -> col (C*kh*kw, N*OH*OW); see the module docstring."""
    xp = backend.get_array_module(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = conv_outsize(h, kh, sh, ph), conv_outsize(w, kw, sw, pw)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    # col6: (C, kh, kw, N, OH, OW); row-major flattening gives the col layout
    col6 = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # window (i, j) of every output pixel: (N, C, OH, OW) -> (C, N, OH, OW)
            patch = x_pad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            col6[:, i, j] = patch.transpose(1, 0, 2, 3)
    return col6.reshape(c * kh * kw, n * oh * ow)


def col2im_reference(col, x_shape, kernel, stride, pad):
    """col (C*kh*kw, N*OH*OW) -> x (N, C, H, W), summing overlapping entries."""
    xp = backend.get_array_module(col)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x_shape
    oh, ow = conv_outsize(h, kh, sh, ph), conv_outsize(w, kw, sw, pw)
    # col6: (C, kh, kw, N, OH, OW)
    col6 = col.reshape(c, kh, kw, n, oh, ow)
    x_pad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            # (C, N, OH, OW) -> (N, C, OH, OW), added onto window (i, j)
            x_pad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += \
                col6[:, i, j].transpose(1, 0, 2, 3)
    return xp.ascontiguousarray(x_pad[:, :, ph:ph + h, pw:pw + w])


# ----------------------------------------------------------------------------
# numba kernels.  Flat 1-D arrays with explicit offsets; offsets are cast to
# Both kernels run one iteration per plane (n, c), in channel-major order (n
# fastest): consecutive iterations then fill (or read) the same kh*kw rows of
# col, each further along, instead of jumping across all C*kh*kw rows -- which
# for a col larger than the TLB's reach costs a page walk per row segment
# (measured: im2col of a 512-channel 8x8 stride-2 conv at batch 128, 88 ms
# sample-major, 28 ms channel-major).
# uint64 before indexing because numba adds a negative-index wrap-around branch
# to every signed index, which stops LLVM from vectorising the unit-stride
# inner loops (measured: 91 ms -> 34 ms for the cifar10-nv conv2 im2col).
# ----------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _valid_range(j, pad, stride, size, out):
    """Output positions o in [lo, hi) with 0 <= o*stride + j - pad < size."""
    lo = 0
    if j < pad:
        lo = (pad - j + stride - 1) // stride
    hi = (size - 1 + pad - j) // stride + 1  # Python floor division in numba
    if hi > out:
        hi = out
    if hi < lo:
        hi = lo
    return lo, hi


@njit(cache=True, inline="always")
def _fill_zero(a, start, count):
    s = uint64(start)
    for t in range(uint64(count)):
        a[s + t] = 0


@njit(parallel=True, cache=True)
def _im2col_kernel(x, n_batch, n_chan, h, w, kh, kw, sh, sw, ph, pw, oh, ow, col):
    plane_out = oh * ow
    n_cols = n_batch * plane_out
    for cn in prange(n_batch * n_chan):
        c = cn // n_batch
        n = cn - c * n_batch
        x_base = (n * n_chan + c) * h * w
        for i in range(kh):
            for j in range(kw):
                row = ((c * kh + i) * kw + j) * n_cols + n * plane_out
                lo, hi = _valid_range(j, pw, sw, w, ow)
                for oy in range(oh):
                    iy = oy * sh + i - ph
                    dst = row + oy * ow
                    if iy < 0 or iy >= h:
                        _fill_zero(col, dst, ow)
                        continue
                    _fill_zero(col, dst, lo)
                    # first valid input column: (lo*sw + j - pw) >= 0
                    src = uint64(x_base + iy * w + lo * sw + j - pw)
                    d = uint64(dst + lo)
                    if sw == 1:
                        for t in range(uint64(hi - lo)):
                            col[d + t] = x[src + t]
                    else:
                        step = uint64(sw)
                        for t in range(uint64(hi - lo)):
                            col[d + t] = x[src + t * step]
                    _fill_zero(col, dst + hi, ow - hi)


@njit(parallel=True, cache=True)
def _col2im_kernel(col, n_batch, n_chan, h, w, kh, kw, sh, sw, ph, pw, oh, ow, x):
    plane_out = oh * ow
    n_cols = n_batch * plane_out
    for cn in prange(n_batch * n_chan):
        c = cn // n_batch
        n = cn - c * n_batch
        x_base = (n * n_chan + c) * h * w
        _fill_zero(x, x_base, h * w)
        for i in range(kh):
            for j in range(kw):
                row = ((c * kh + i) * kw + j) * n_cols + n * plane_out
                lo, hi = _valid_range(j, pw, sw, w, ow)
                for oy in range(oh):
                    iy = oy * sh + i - ph
                    if iy < 0 or iy >= h:
                        continue
                    src = uint64(row + oy * ow + lo)
                    dst = uint64(x_base + iy * w + lo * sw + j - pw)
                    if sw == 1:
                        for t in range(uint64(hi - lo)):
                            x[dst + t] += col[src + t]
                    else:
                        step = uint64(sw)
                        for t in range(uint64(hi - lo)):
                            x[dst + t * step] += col[src + t]


_im2col_serial = serial_twin(_im2col_kernel)
_col2im_serial = serial_twin(_col2im_kernel)


def im2col(x, kernel, stride, pad, out=None, serial=False):
    """x (N, C, H, W) -> col (C*kh*kw, N*OH*OW).

    ``out``: optional C-contiguous buffer with at least C*kh*kw*N*OH*OW
    elements of x's dtype; its leading part is filled and returned as a view
    (this is how conv2d reuses one workspace across calls).  NumPy float32 /
    float64 input runs the numba kernel; anything else the reference.
    ``serial``: run the single-threaded kernel on the calling thread (GIL released).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = conv_outsize(h, kh, sh, ph), conv_outsize(w, kw, sw, pw)
    shape = (c * kh * kw, n * oh * ow)
    if not fast_ok(x):
        col = im2col_reference(x, kernel, stride, pad)
        if out is not None:
            view = out.reshape(-1)[:col.size].reshape(shape)
            view[...] = col
            return view
        return col
    x = np.ascontiguousarray(x)
    size = shape[0] * shape[1]
    if out is None:
        flat = np.empty(size, dtype=x.dtype)
    else:
        flat = out.reshape(-1)[:size]
    args = (x.reshape(-1), n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, flat)
    if serial:
        _im2col_serial(*args)
    else:
        launch(_im2col_kernel, n * c, size, *args)
    return flat.reshape(shape)


def col2im(col, x_shape, kernel, stride, pad, out=None, serial=False):
    """col (C*kh*kw, N*OH*OW) -> x (N, C, H, W), the adjoint of :func:`im2col`.

    ``out``: optional C-contiguous (N, C, H, W) array to write into (every
    element is overwritten).  ``serial`` as in :func:`im2col`.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x_shape
    oh, ow = conv_outsize(h, kh, sh, ph), conv_outsize(w, kw, sw, pw)
    if col.shape != (c * kh * kw, n * oh * ow):
        raise ValueError(f"col2im: col has shape {col.shape}, expected "
                         f"{(c * kh * kw, n * oh * ow)} for x shape {tuple(x_shape)}")
    if not fast_ok(col):
        x = col2im_reference(col, x_shape, kernel, stride, pad)
        if out is not None:
            out[...] = x
            return out
        return x
    col = np.ascontiguousarray(col)
    if out is None:
        out = np.empty((n, c, h, w), dtype=col.dtype)
    args = (col.reshape(-1), n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, out.reshape(-1))
    if serial:
        _col2im_serial(*args)
    else:
        launch(_col2im_kernel, n * c, col.size, *args)
    return out

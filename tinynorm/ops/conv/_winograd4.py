"""Winograd F(4x4, 3x3): the 3x3 / stride-1 convolution with 4x fewer
multiplications than the direct one (Lavin & Gray 2016): the kernels of the
``winograd4`` convolution plan, the CPU default for 3x3 / stride-1 convs with
enough channels, which :mod:`tinynorm.ops.conv.winograd` drives
(``settings.using(winograd_tile=2)`` selects :mod:`._winograd2`, F(2x2, 3x3)).

Same scheme as F(2x2, 3x3) -- read that module's docstring first -- with 4x4
output tiles, 6x6 input patches (rows ``4*ty - ph ..``, columns ``4*tx - pw ..``
of the zero-padded input) and 36 transform-domain positions k = 6a + b::

    Y (4x4) = A^T [ (G g G^T) (*) (B^T d B) ] A

    B^T = [[4, 0,-5, 0, 1, 0],   G = [[ 1/4,    0,    0],   A^T = [[1, 1, 1, 1, 1, 0],
           [0,-4,-4, 1, 1, 0],        [-1/6, -1/6, -1/6],          [0, 1,-1, 2,-2, 0],
           [0, 4,-4,-1, 1, 0],        [-1/6,  1/6, -1/6],          [0, 1, 1, 4, 4, 0],
           [0,-2,-1, 2, 1, 0],        [1/24, 1/12,  1/6],          [0, 1,-1, 8,-8, 1]]
           [0, 2,-1,-2, 1, 0],        [1/24,-1/12,  1/6],
           [0, 4, 0,-5, 0, 1]]        [   0,    0,    1]]

(interpolation points 0, +-1, +-2 and infinity).  Against F(2x2, 3x3) each
output costs 36/16 = 2.25 transform-domain values instead of 16/4 = 4, so the
16 -> 36 GEMMs together do 0.56x the multiply-adds and the transforms move
0.56x the data.  The price is rounding: the transforms multiply by up to 8
and by 1/24, so float32 results carry errors of about 1e-6 to 1e-5 of the
result's scale (against ~1e-7 for F(2x2, 3x3) and for im2col); the tests
hold that bound.  To keep it there, the input and output transforms compute
in float64 registers (only the stored V, M and the GEMMs are float32).

Each 2-D transform runs as two 1-D passes per tile row: one along the
columns of the plane, over all its pixels at once (unit stride, vectorised),
and one per tile along its rows.  The backward passes are the exact
transposes of the forward maps (tested as adjoints), so they are the
gradients of the function the forward computes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import settings
from .._kernels import serial_twin
from ._winograd2 import (_base, _crop, _run, buffer_size as _buffer_size, k_stride,
                         kron_filter_transform, kron_filter_transform_adjoint)
from ._winograd2 import transform_buffer as _transform_buffer

__all__ = ["M", "SLICES", "tiles", "filter_transform", "filter_transform_adjoint",
           "input_transform", "input_transform_adjoint", "output_transform",
           "output_transform_adjoint", "transform_buffer", "buffer_size", "k_stride",
           "G", "BT", "AT"]

M = 4           # output tile
SLICES = 36     # transform-domain positions (M + 2)^2

BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
              dtype=np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def tiles(oh, ow):
    """Number of 4x4 output tiles along each axis: (ceil(OH/4), ceil(OW/4))."""
    return (oh + 3) // 4, (ow + 3) // 4


def transform_buffer(buf, rows, cols):
    """A (36, rows, cols) view of ``buf`` (see ``_winograd2.transform_buffer``)."""
    return _transform_buffer(buf, rows, cols, SLICES)


def buffer_size(rows, cols, itemsize):
    """Elements of a flat workspace for :func:`transform_buffer`."""
    return _buffer_size(rows, cols, itemsize, SLICES)


KRON = np.kron(G, G)


def filter_transform(w):
    """w (C_out, C, 3, 3) -> U (36, C_out, C), U[6a+b] = (G w G^T)[a, b], in w's dtype."""
    return kron_filter_transform(w, KRON)


def filter_transform_adjoint(du):
    """dU (36, C_out, C) -> dw (C_out, C, 3, 3) = G^T dU G (the transpose of
    :func:`filter_transform`), in dU's dtype."""
    return kron_filter_transform_adjoint(du, KRON)


# ----------------------------------------------------------------------------
# the 1-D transforms (float64 arithmetic: the float literals promote)
# ----------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d."""
    return (4.0 * d0 - 5.0 * d2 + d4,
            d3 + d4 - 4.0 * (d1 + d2),
            4.0 * (d1 - d2) + d4 - d3,
            2.0 * (d3 - d1) + d4 - d2,
            2.0 * (d1 - d3) + d4 - d2,
            4.0 * d1 - 5.0 * d3 + d5)


@njit(cache=True, inline="always")
def _b(t0, t1, t2, t3, t4, t5):
    """B t (the transpose of :func:`_bt`)."""
    return (4.0 * t0,
            4.0 * (t2 - t1 + t5) + 2.0 * (t4 - t3),
            -5.0 * t0 - 4.0 * (t1 + t2) - t3 - t4,
            t1 - t2 + 2.0 * (t3 - t4) - 5.0 * t5,
            t0 + t1 + t2 + t3 + t4,
            t5)


@njit(cache=True, inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m."""
    return (m0 + m1 + m2 + m3 + m4,
            m1 - m2 + 2.0 * (m3 - m4),
            m1 + m2 + 4.0 * (m3 + m4),
            m1 - m2 + 8.0 * (m3 - m4) + m5)


@njit(cache=True, inline="always")
def _a(y0, y1, y2, y3):
    """A y (the transpose of :func:`_at`)."""
    return (y0,
            y0 + y1 + y2 + y3,
            y0 - y1 + y2 - y3,
            y0 + 2.0 * y1 + 4.0 * y2 + 8.0 * y3,
            y0 - 2.0 * y1 + 4.0 * y2 - 8.0 * y3,
            y3)


# ----------------------------------------------------------------------------
# input transform and its adjoint.  Each plane is copied into a zero-padded
# float64 scratch of (4*th + 2) x (4*tw + 2) pixels (pixels past it feed only
# dropped outputs); t holds one tile row after the pass along the columns.
# ----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _input_kernel(x, n_batch, n_chan, h, w, ph, pw, th, tw, sk, v, n_blocks):
    """v[(6a+b)*sk + c*T + (n*th + ty)*tw + tx] = (B^T d B)[a, b] for plane (n, c)."""
    n_tiles = n_batch * th * tw
    n_planes = n_batch * n_chan
    sh = 4 * th + 2
    sw = 4 * tw + 2
    for blk in prange(n_blocks):
      pad = np.zeros((sh, sw), dtype=np.float64)   # the border stays zero
      t = np.empty((6, sw), dtype=np.float64)
      for nc in range(blk * n_planes // n_blocks, (blk + 1) * n_planes // n_blocks):
        c = nc // n_batch     # channel-major: see _geometry's im2col kernel
        n = nc - c * n_batch
        base = (n * n_chan + c) * h * w
        for iy in range(min(h, sh - ph)):
            for ix in range(min(w, sw - pw)):
                pad[iy + ph, ix + pw] = x[base + iy * w + ix]
        out = c * n_tiles + n * th * tw
        for ty in range(th):
            r = 4 * ty
            for j in range(sw):
                t0, t1, t2, t3, t4, t5 = _bt(pad[r, j], pad[r + 1, j], pad[r + 2, j],
                                             pad[r + 3, j], pad[r + 4, j], pad[r + 5, j])
                t[0, j] = t0
                t[1, j] = t1
                t[2, j] = t2
                t[3, j] = t3
                t[4, j] = t4
                t[5, j] = t5
            for tx in range(tw):
                j = 4 * tx
                q = out + ty * tw + tx
                for a in range(6):
                    ta = t[a]
                    v0, v1, v2, v3, v4, v5 = _bt(ta[j], ta[j + 1], ta[j + 2], ta[j + 3],
                                                 ta[j + 4], ta[j + 5])
                    k = 6 * a * sk + q
                    v[k] = v0
                    v[k + sk] = v1
                    v[k + 2 * sk] = v2
                    v[k + 3 * sk] = v3
                    v[k + 4 * sk] = v4
                    v[k + 5 * sk] = v5


@njit(parallel=True, cache=True)
def _input_adjoint_kernel(dv, n_batch, n_chan, h, w, ph, pw, th, tw, sk, dx, n_blocks):
    """dx[plane (n, c)] = sum over tiles of (B dV B^T), scattered onto the padded
    plane and cropped (the adjoint of ``_input_kernel``); dx is overwritten."""
    n_tiles = n_batch * th * tw
    n_planes = n_batch * n_chan
    sh = 4 * th + 2
    sw = 4 * tw + 2
    for blk in prange(n_blocks):
      pad = np.empty((sh, sw), dtype=np.float64)
      t = np.empty((6, sw), dtype=np.float64)
      for nc in range(blk * n_planes // n_blocks, (blk + 1) * n_planes // n_blocks):
        c = nc // n_batch     # channel-major: see _geometry's im2col kernel
        n = nc - c * n_batch
        pad[:, :] = 0.0
        src = c * n_tiles + n * th * tw
        for ty in range(th):
            t[:, :] = 0.0
            for tx in range(tw):
                j = 4 * tx
                q = src + ty * tw + tx
                for a in range(6):
                    k = 6 * a * sk + q
                    p0, p1, p2, p3, p4, p5 = _b(dv[k], dv[k + sk], dv[k + 2 * sk],
                                                dv[k + 3 * sk], dv[k + 4 * sk], dv[k + 5 * sk])
                    ta = t[a]
                    ta[j] += p0
                    ta[j + 1] += p1
                    ta[j + 2] += p2
                    ta[j + 3] += p3
                    ta[j + 4] += p4
                    ta[j + 5] += p5
            r = 4 * ty
            for j in range(sw):
                d0, d1, d2, d3, d4, d5 = _b(t[0, j], t[1, j], t[2, j], t[3, j], t[4, j],
                                            t[5, j])
                pad[r, j] += d0
                pad[r + 1, j] += d1
                pad[r + 2, j] += d2
                pad[r + 3, j] += d3
                pad[r + 4, j] += d4
                pad[r + 5, j] += d5
        base = (n * n_chan + c) * h * w
        _crop(pad, ph, pw, h, w, dx, base)


# ----------------------------------------------------------------------------
# output transform and its adjoint
# ----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _output_kernel(m, bias, n_batch, n_out, oh, ow, th, tw, sk, y, n_blocks):
    """y[n, o] = A^T M A per tile, + bias[o] (flat arrays; drops outputs past OH/OW)."""
    n_tiles = n_batch * th * tw
    n_planes = n_batch * n_out
    for blk in prange(n_blocks):
      t = np.empty((6, 4 * tw), dtype=np.float64)
      for no in range(blk * n_planes // n_blocks, (blk + 1) * n_planes // n_blocks):
        o = no // n_batch     # channel-major
        n = no - o * n_batch
        bo = np.float64(bias[o])
        src = o * n_tiles + n * th * tw
        base = (n * n_out + o) * oh * ow
        for ty in range(th):
            for tx in range(tw):
                q = src + ty * tw + tx
                j = 4 * tx
                for a in range(6):
                    k = 6 * a * sk + q
                    c0, c1, c2, c3 = _at(m[k], m[k + sk], m[k + 2 * sk], m[k + 3 * sk],
                                         m[k + 4 * sk], m[k + 5 * sk])
                    ta = t[a]
                    ta[j] = c0
                    ta[j + 1] = c1
                    ta[j + 2] = c2
                    ta[j + 3] = c3
            oy = 4 * ty
            rows = min(4, oh - oy)
            d = base + oy * ow
            for j in range(ow):
                y0, y1, y2, y3 = _at(t[0, j], t[1, j], t[2, j], t[3, j], t[4, j], t[5, j])
                y[d + j] = y0 + bo
                if rows > 1:
                    y[d + ow + j] = y1 + bo
                if rows > 2:
                    y[d + 2 * ow + j] = y2 + bo
                if rows > 3:
                    y[d + 3 * ow + j] = y3 + bo


@njit(parallel=True, cache=True)
def _output_adjoint_kernel(dy, n_batch, n_out, oh, ow, th, tw, sk, dm, sums, n_blocks):
    """dm[k, o, tile] = (A dY A^T)[k], dY the 4x4 tile of dy (zero past OH/OW);
    sums[n*C_out + o] = the float64 sum of plane (n, o) of dy (for db)."""
    n_tiles = n_batch * th * tw
    n_planes = n_batch * n_out
    for blk in prange(n_blocks):
      t = np.empty((6, 4 * tw), dtype=np.float64)
      for no in range(blk * n_planes // n_blocks, (blk + 1) * n_planes // n_blocks):
        o = no // n_batch     # channel-major
        n = no - o * n_batch
        dst = o * n_tiles + n * th * tw
        base = (n * n_out + o) * oh * ow
        acc = 0.0
        for ty in range(th):
            oy = 4 * ty
            rows = min(4, oh - oy)
            d = base + oy * ow
            for j in range(4 * tw):
                y0 = 0.0
                y1 = 0.0
                y2 = 0.0
                y3 = 0.0
                if j < ow:
                    y0 = dy[d + j]
                    if rows > 1:
                        y1 = dy[d + ow + j]
                    if rows > 2:
                        y2 = dy[d + 2 * ow + j]
                    if rows > 3:
                        y3 = dy[d + 3 * ow + j]
                acc += (y0 + y1) + (y2 + y3)
                u0, u1, u2, u3, u4, u5 = _a(y0, y1, y2, y3)
                t[0, j] = u0
                t[1, j] = u1
                t[2, j] = u2
                t[3, j] = u3
                t[4, j] = u4
                t[5, j] = u5
            for tx in range(tw):
                j = 4 * tx
                q = dst + ty * tw + tx
                for a in range(6):
                    ta = t[a]
                    e0, e1, e2, e3, e4, e5 = _a(ta[j], ta[j + 1], ta[j + 2], ta[j + 3])
                    k = 6 * a * sk + q
                    dm[k] = e0
                    dm[k + sk] = e1
                    dm[k + 2 * sk] = e2
                    dm[k + 3 * sk] = e3
                    dm[k + 4 * sk] = e4
                    dm[k + 5 * sk] = e5
        sums[n * n_out + o] = acc


# single-threaded twins that release the GIL (conv2d's batch pipeline)
_input_serial = serial_twin(_input_kernel)
_input_adjoint_serial = serial_twin(_input_adjoint_kernel)
_output_serial = serial_twin(_output_kernel)
_output_adjoint_serial = serial_twin(_output_adjoint_kernel)


def _blocks(n_planes, serial):
    """How many blocks of planes (each with its own scratch) a kernel's prange
    runs: one for the serial twins, else up to the ``winograd4_blocks``
    setting (the dynamic schedule of ``_kernels.launch`` deals them out)."""
    return 1 if serial else max(1, min(n_planes, settings.current().winograd4_blocks))


def input_transform(x, pad, v, serial=False):
    """x (N, C, H, W) C-contiguous -> V (36, C, N*th*tw) written into the
    :func:`transform_buffer` view ``v``; returns ``v``."""
    n, c, h, w = x.shape
    th, tw = tiles(h + 2 * pad[0] - 2, w + 2 * pad[1] - 2)
    if v.shape != (SLICES, c, n * th * tw):
        raise ValueError(f"winograd4 input_transform: buffer {v.shape}, expected "
                         f"{(SLICES, c, n * th * tw)}")
    sk = v.strides[0] // v.itemsize
    blocks = _blocks(n * c, serial)
    _run(_input_kernel, _input_serial, serial, blocks, SLICES * c * n * th * tw,
         x.reshape(-1), n, c, h, w, pad[0], pad[1], th, tw, sk, _base(v), blocks)
    return v


def input_transform_adjoint(dv, x_shape, pad, out, serial=False):
    """dV (36, C, N*th*tw) (a :func:`transform_buffer` view) -> dx (N, C, H, W)
    written into ``out`` (C-contiguous)."""
    n, c, h, w = x_shape
    th, tw = tiles(h + 2 * pad[0] - 2, w + 2 * pad[1] - 2)
    sk = dv.strides[0] // dv.itemsize
    blocks = _blocks(n * c, serial)
    _run(_input_adjoint_kernel, _input_adjoint_serial, serial, blocks,
         SLICES * c * n * th * tw, _base(dv), n, c, h, w, pad[0], pad[1], th, tw, sk,
         out.reshape(-1), blocks)
    return out


def output_transform(m, n, oh, ow, bias, out, serial=False):
    """M (36, C_out, N*th*tw) (a :func:`transform_buffer` view) -> y (N, C_out,
    OH, OW) + bias, written into ``out``."""
    c_out = m.shape[1]
    th, tw = tiles(oh, ow)
    if bias is None:
        bias = np.zeros(c_out, dtype=m.dtype)
    sk = m.strides[0] // m.itemsize
    blocks = _blocks(n * c_out, serial)
    _run(_output_kernel, _output_serial, serial, blocks, SLICES * c_out * n * th * tw,
         _base(m), np.ascontiguousarray(bias, dtype=m.dtype),
         n, c_out, oh, ow, th, tw, sk, out.reshape(-1), blocks)
    return out


def output_transform_adjoint(dy, dm, serial=False):
    """dy (N, C_out, OH, OW) C-contiguous -> dM (36, C_out, N*th*tw) written into
    the :func:`transform_buffer` view ``dm``; returns (dm, the float64
    per-channel sums of dy (C_out,))."""
    n, c_out, oh, ow = dy.shape
    th, tw = tiles(oh, ow)
    if dm.shape != (SLICES, c_out, n * th * tw):
        raise ValueError(f"winograd4 output_transform_adjoint: buffer {dm.shape}, "
                         f"expected {(SLICES, c_out, n * th * tw)}")
    sums = np.empty(n * c_out, dtype=np.float64)
    sk = dm.strides[0] // dm.itemsize
    blocks = _blocks(n * c_out, serial)
    _run(_output_adjoint_kernel, _output_adjoint_serial, serial, blocks,
         SLICES * c_out * n * th * tw, dy.reshape(-1), n, c_out, oh, ow, th, tw, sk,
         _base(dm), sums, blocks)
    return dm, sums.reshape(n, c_out).sum(axis=0)

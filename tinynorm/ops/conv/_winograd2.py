"""Winograd F(2x2, 3x3): the 3x3 / stride-1 convolution with 2.25x fewer
multiplications (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016).  The kernels of the ``winograd2`` convolution plan, which
:mod:`tinynorm.ops.conv.winograd` drives: chosen for 3x3 / stride-1 convs
with enough channels under ``tinynorm.settings.using(winograd_tile=2)``; the
default is F(4x4, 3x3) (:mod:`._winograd4`), which builds on the scheme
described here.

The output is cut into 2x2 tiles; tile ``t = (n, ty, tx)`` reads the 4x4 input
patch ``d`` at rows ``2*ty - ph ..``, columns ``2*tx - pw ..`` of the zero-padded
input.  With the constant matrices

    B^T = [[1, 0,-1, 0],      G = [[ 1,   0,   0 ],      A^T = [[1, 1, 1, 0],
           [0, 1, 1, 0],           [ 1/2, 1/2, 1/2],             [0, 1,-1,-1]]
           [0,-1, 1, 0],           [ 1/2,-1/2, 1/2],
           [0, 1, 0,-1]]           [ 0,   0,   1 ]]

the cross-correlation of ``d`` with a 3x3 filter ``g`` is exactly

    Y (2x2) = A^T [ (G g G^T) (*) (B^T d B) ] A          (*) elementwise.

Over channels, the elementwise product becomes 16 independent GEMMs, one per
transform-domain position k = 4a + b::

    U[k] (C_out, C)  = (G w G^T)[k]          filter transform   (:func:`filter_transform`)
    V[k] (C, T)      = (B^T d B)[k]          input transform    (numba, per chunk of samples)
    M[k] (C_out, T)  = U[k] @ V[k]           16 GEMMs
    y                = A^T M A per tile      output transform   (numba)

The backward passes are the exact transposes of these linear maps (the
algorithm computes the same function as the direct convolution, so these are
its gradients, not an approximation of them)::

    dM[k] = (A dY A^T)[k]                    (dY: the 2x2 tile of dy, zero past the edge)
    dU[k] = sum over tiles  dM[k] @ V[k]^T    dw = G^T dU G
    dV[k] = U[k]^T @ dM[k]                   dx = sum over tiles of (B dV B^T), scattered

Rounding differs from the im2col path (the transforms add and subtract
inputs before the products): relative errors stay at a few float32 ulps of
the operands' scale, and float64 results agree with the direct convolution to
~1e-15 (tested).  ``settings.using(winograd=False)`` switches the path off.

Every numba kernel here runs one prange over the N*C planes of its chunk, each
iteration owning its plane; the single-threaded twins release the GIL for
conv2d's per-thread batch pipeline.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._kernels import launch, serial_twin

__all__ = ["M", "SLICES", "tiles", "filter_transform", "filter_transform_adjoint", "input_transform",
           "input_transform_adjoint", "output_transform", "output_transform_adjoint",
           "transform_buffer", "buffer_size", "k_stride", "G", "BT", "AT"]

M = 2           # output tile
SLICES = 16     # transform-domain positions (M + 2)^2

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def tiles(oh, ow):
    """Number of 2x2 output tiles along each axis: (ceil(OH/2), ceil(OW/2))."""
    return (oh + 1) // 2, (ow + 1) // 2


def kron_filter_transform(w, kron):
    """w (C_out, C, 3, 3) -> U (S, C_out, C) = kron @ w2^T, with kron = G (x) G
    (S, 9) and w2 = w as (C_out*C, 9): U[k] = (G w G^T)[a, b] for k = a*m + b.
    One GEMM in w's dtype (an einsum's float64 temporaries cost 0.1 s for a
    512x512 filter bank)."""
    c_out, c = w.shape[:2]
    w2 = np.ascontiguousarray(w).reshape(c_out * c, 9)
    return (kron.astype(w.dtype) @ w2.T).reshape(kron.shape[0], c_out, c)


def kron_filter_transform_adjoint(du, kron):
    """dU (S, C_out, C) -> dw (C_out, C, 3, 3) = dU2^T @ kron, the transpose of
    :func:`kron_filter_transform`, in dU's dtype."""
    s, c_out, c = du.shape
    du2 = np.ascontiguousarray(du).reshape(s, c_out * c)
    return (du2.T @ kron.astype(du.dtype)).reshape(c_out, c, 3, 3)


KRON = np.kron(G, G)


def filter_transform(w):
    """w (C_out, C, 3, 3) -> U (16, C_out, C), U[4a+b] = (G w G^T)[a, b]."""
    return kron_filter_transform(w, KRON)


def filter_transform_adjoint(du):
    """dU (16, C_out, C) -> dw (C_out, C, 3, 3) = G^T dU G (the transpose of
    :func:`filter_transform`)."""
    return kron_filter_transform_adjoint(du, KRON)


# ----------------------------------------------------------------------------
# input transform and its adjoint.  Each plane is first copied into a
# zero-padded scratch of (2*th + 2) x (2*tw + 2) pixels, so the tile loop needs
# no bounds checks; the scratch is padded to the last tile's patch, past which
# the pixels feed only outputs that are dropped.
# ----------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _crop(pad, ph, pw, h, w, dx, base):
    """dx[base + iy*w + ix] = pad[iy + ph, ix + pw] for the h x w plane at
    ``base`` of the flat dx; 0 where that lies past the scratch ``pad``."""
    sh, sw = pad.shape
    for iy in range(h):
        py = iy + ph
        for ix in range(w):
            px = ix + pw
            if py < sh and px < sw:
                dx[base + iy * w + ix] = pad[py, px]
            else:
                dx[base + iy * w + ix] = 0


@njit(parallel=True, cache=True)
def _input_kernel(x, n_batch, n_chan, h, w, ph, pw, th, tw, stride_k, v):
    """v[k, c, (n*th + ty)*tw + tx] = (B^T d B)[k] for plane (n, c) of x (flat arrays)."""
    n_tiles = n_batch * th * tw
    sh = 2 * th + 2
    sw = 2 * tw + 2
    for nc in prange(n_batch * n_chan):
        c = nc // n_batch     # channel-major: see _geometry's im2col kernel
        n = nc - c * n_batch
        pad = np.zeros((sh, sw), dtype=x.dtype)
        base = (n * n_chan + c) * h * w
        for iy in range(h):
            py = iy + ph
            if py >= sh:
                break
            for ix in range(w):
                px = ix + pw
                if px >= sw:
                    break
                pad[py, px] = x[base + iy * w + ix]
        out = c * n_tiles + n * th * tw
        for ty in range(th):
            r0 = pad[2 * ty]
            r1 = pad[2 * ty + 1]
            r2 = pad[2 * ty + 2]
            r3 = pad[2 * ty + 3]
            o = out + ty * tw
            for tx in range(tw):
                j = 2 * tx
                # B^T d: rows combined
                a0 = r0[j] - r2[j]
                a1 = r0[j + 1] - r2[j + 1]
                a2 = r0[j + 2] - r2[j + 2]
                a3 = r0[j + 3] - r2[j + 3]
                b0 = r1[j] + r2[j]
                b1 = r1[j + 1] + r2[j + 1]
                b2 = r1[j + 2] + r2[j + 2]
                b3 = r1[j + 3] + r2[j + 3]
                c0 = r2[j] - r1[j]
                c1 = r2[j + 1] - r1[j + 1]
                c2 = r2[j + 2] - r1[j + 2]
                c3 = r2[j + 3] - r1[j + 3]
                d0 = r1[j] - r3[j]
                d1 = r1[j + 1] - r3[j + 1]
                d2 = r1[j + 2] - r3[j + 2]
                d3 = r1[j + 3] - r3[j + 3]
                # (B^T d) B: columns combined
                q = o + tx
                v[q] = a0 - a2
                v[q + stride_k] = a1 + a2
                v[q + 2 * stride_k] = a2 - a1
                v[q + 3 * stride_k] = a1 - a3
                v[q + 4 * stride_k] = b0 - b2
                v[q + 5 * stride_k] = b1 + b2
                v[q + 6 * stride_k] = b2 - b1
                v[q + 7 * stride_k] = b1 - b3
                v[q + 8 * stride_k] = c0 - c2
                v[q + 9 * stride_k] = c1 + c2
                v[q + 10 * stride_k] = c2 - c1
                v[q + 11 * stride_k] = c1 - c3
                v[q + 12 * stride_k] = d0 - d2
                v[q + 13 * stride_k] = d1 + d2
                v[q + 14 * stride_k] = d2 - d1
                v[q + 15 * stride_k] = d1 - d3


@njit(parallel=True, cache=True)
def _input_adjoint_kernel(dv, n_batch, n_chan, h, w, ph, pw, th, tw, stride_k, dx):
    """dx[plane (n, c)] = sum over tiles of (B dV B^T) scattered onto the padded
    plane, cropped (the adjoint of ``_input_kernel``); dx is overwritten."""
    n_tiles = n_batch * th * tw
    sh = 2 * th + 2
    sw = 2 * tw + 2
    for nc in prange(n_batch * n_chan):
        c = nc // n_batch     # channel-major: see _geometry's im2col kernel
        n = nc - c * n_batch
        pad = np.zeros((sh, sw), dtype=dv.dtype)
        src = c * n_tiles + n * th * tw
        for ty in range(th):
            r0 = pad[2 * ty]
            r1 = pad[2 * ty + 1]
            r2 = pad[2 * ty + 2]
            r3 = pad[2 * ty + 3]
            o = src + ty * tw
            for tx in range(tw):
                q = o + tx
                # rows a of dV, each turned by B into 4 patch columns: B v = (v0, v1-v2+v3, v1+v2-v0, -v3)
                e0 = dv[q]
                e1 = dv[q + stride_k]
                e2 = dv[q + 2 * stride_k]
                e3 = dv[q + 3 * stride_k]
                f0 = dv[q + 4 * stride_k]
                f1 = dv[q + 5 * stride_k]
                f2 = dv[q + 6 * stride_k]
                f3 = dv[q + 7 * stride_k]
                g0 = dv[q + 8 * stride_k]
                g1 = dv[q + 9 * stride_k]
                g2 = dv[q + 10 * stride_k]
                g3 = dv[q + 11 * stride_k]
                k0 = dv[q + 12 * stride_k]
                k1 = dv[q + 13 * stride_k]
                k2 = dv[q + 14 * stride_k]
                k3 = dv[q + 15 * stride_k]
                # columns: B applied along the row index a (patch rows i)
                # patch row 0 = row a0;  row 1 = a1 - a2 + a3;  row 2 = a1 + a2 - a0;  row 3 = -a3
                p0 = e0
                p1 = e1 - e2 + e3
                p2 = e1 + e2 - e0
                p3 = -e3
                s0 = f0
                s1 = f1 - f2 + f3
                s2 = f1 + f2 - f0
                s3 = -f3
                u0 = g0
                u1 = g1 - g2 + g3
                u2 = g1 + g2 - g0
                u3 = -g3
                z0 = k0
                z1 = k1 - k2 + k3
                z2 = k1 + k2 - k0
                z3 = -k3
                j = 2 * tx
                r0[j] += p0
                r0[j + 1] += p1
                r0[j + 2] += p2
                r0[j + 3] += p3
                r1[j] += s0 - u0 + z0
                r1[j + 1] += s1 - u1 + z1
                r1[j + 2] += s2 - u2 + z2
                r1[j + 3] += s3 - u3 + z3
                r2[j] += s0 + u0 - p0
                r2[j + 1] += s1 + u1 - p1
                r2[j + 2] += s2 + u2 - p2
                r2[j + 3] += s3 + u3 - p3
                r3[j] -= z0
                r3[j + 1] -= z1
                r3[j + 2] -= z2
                r3[j + 3] -= z3
        base = (n * n_chan + c) * h * w
        _crop(pad, ph, pw, h, w, dx, base)


# ----------------------------------------------------------------------------
# output transform and its adjoint
# ----------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _output_kernel(m, bias, n_batch, n_out, oh, ow, th, tw, stride_k, y):
    """y[n, o] = A^T M A per tile, + bias[o] (flat arrays; drops outputs past OH/OW)."""
    n_tiles = n_batch * th * tw
    for no in prange(n_batch * n_out):
        o = no // n_batch     # channel-major
        n = no - o * n_batch
        bo = bias[o]
        src = o * n_tiles + n * th * tw
        base = (n * n_out + o) * oh * ow
        for ty in range(th):
            for tx in range(tw):
                q = src + ty * tw + tx
                m0 = m[q]
                m1 = m[q + stride_k]
                m2 = m[q + 2 * stride_k]
                m3 = m[q + 3 * stride_k]
                m4 = m[q + 4 * stride_k]
                m5 = m[q + 5 * stride_k]
                m6 = m[q + 6 * stride_k]
                m7 = m[q + 7 * stride_k]
                m8 = m[q + 8 * stride_k]
                m9 = m[q + 9 * stride_k]
                m10 = m[q + 10 * stride_k]
                m11 = m[q + 11 * stride_k]
                m12 = m[q + 12 * stride_k]
                m13 = m[q + 13 * stride_k]
                m14 = m[q + 14 * stride_k]
                m15 = m[q + 15 * stride_k]
                # A^T along rows: t0 = row0 + row1 + row2, t1 = row1 - row2 - row3
                t00 = m0 + m4 + m8
                t01 = m1 + m5 + m9
                t02 = m2 + m6 + m10
                t03 = m3 + m7 + m11
                t10 = m4 - m8 - m12
                t11 = m5 - m9 - m13
                t12 = m6 - m10 - m14
                t13 = m7 - m11 - m15
                oy = 2 * ty
                ox = 2 * tx
                d = base + oy * ow + ox
                y[d] = t00 + t01 + t02 + bo
                if ox + 1 < ow:
                    y[d + 1] = t01 - t02 - t03 + bo
                if oy + 1 < oh:
                    y[d + ow] = t10 + t11 + t12 + bo
                    if ox + 1 < ow:
                        y[d + ow + 1] = t11 - t12 - t13 + bo


@njit(parallel=True, cache=True)
def _output_adjoint_kernel(dy, n_batch, n_out, oh, ow, th, tw, stride_k, dm, sums):
    """dm[k, o, tile] = (A dY A^T)[k], dY the 2x2 tile of dy (zero past OH/OW);
    sums[n*C_out + o] = the float64 sum of plane (n, o) of dy (for db)."""
    n_tiles = n_batch * th * tw
    zero = np.zeros(1, dtype=dy.dtype)[0]
    for no in prange(n_batch * n_out):
        o = no // n_batch     # channel-major
        n = no - o * n_batch
        dst = o * n_tiles + n * th * tw
        base = (n * n_out + o) * oh * ow
        acc = 0.0
        for ty in range(th):
            for tx in range(tw):
                oy = 2 * ty
                ox = 2 * tx
                d = base + oy * ow + ox
                y00 = dy[d]
                y01 = zero
                y10 = zero
                y11 = zero
                if ox + 1 < ow:
                    y01 = dy[d + 1]
                if oy + 1 < oh:
                    y10 = dy[d + ow]
                    if ox + 1 < ow:
                        y11 = dy[d + ow + 1]
                acc += (y00 + y01) + (y10 + y11)
                # A y = (y0, y0 + y1, y0 - y1, -y1), rows then columns
                u00 = y00
                u01 = y01
                u10 = y00 + y10
                u11 = y01 + y11
                u20 = y00 - y10
                u21 = y01 - y11
                u30 = -y10
                u31 = -y11
                q = dst + ty * tw + tx
                dm[q] = u00
                dm[q + stride_k] = u00 + u01
                dm[q + 2 * stride_k] = u00 - u01
                dm[q + 3 * stride_k] = -u01
                dm[q + 4 * stride_k] = u10
                dm[q + 5 * stride_k] = u10 + u11
                dm[q + 6 * stride_k] = u10 - u11
                dm[q + 7 * stride_k] = -u11
                dm[q + 8 * stride_k] = u20
                dm[q + 9 * stride_k] = u20 + u21
                dm[q + 10 * stride_k] = u20 - u21
                dm[q + 11 * stride_k] = -u21
                dm[q + 12 * stride_k] = u30
                dm[q + 13 * stride_k] = u30 + u31
                dm[q + 14 * stride_k] = u30 - u31
                dm[q + 15 * stride_k] = -u31
        sums[n * n_out + o] = acc


# single-threaded twins that release the GIL (conv2d's batch pipeline)
_input_serial = serial_twin(_input_kernel)
_input_adjoint_serial = serial_twin(_input_adjoint_kernel)
_output_serial = serial_twin(_output_kernel)
_output_adjoint_serial = serial_twin(_output_adjoint_kernel)


def _run(parallel_kernel, serial_kernel, serial, n_iter, work, *args):
    if serial:
        serial_kernel(*args)
    else:
        launch(parallel_kernel, n_iter, work, *args)


def k_stride(rows, cols, itemsize):
    """Elements between consecutive k-slices of a transform-domain buffer
    (16, rows, cols): rows*cols rounded up to 4 KiB, plus 256 bytes.

    The transform kernels read or write all 16 slices of a tile at once; with
    slices a multiple of 4 KiB apart the 16 streams fall into the same L1
    cache sets and evict each other (measured: the input transform of
    cifar10-nv conv2 ran 3x slower for chunks of 8 samples than of 7).
    Offsetting slice k by k*256 bytes spreads them over all sets."""
    size = rows * cols * itemsize
    return (-(-size // 4096) * 4096 + 256) // itemsize


def transform_buffer(buf, rows, cols, slices=16):
    """A (slices, rows, cols) view of the flat workspace ``buf`` with k-slices
    :func:`k_stride` apart (each slice C-contiguous, as BLAS wants it);
    ``buf`` needs :func:`buffer_size` elements.  16 slices for F(2x2, 3x3),
    36 for F(4x4, 3x3) (:mod:`._winograd4`)."""
    sk = k_stride(rows, cols, buf.itemsize)
    return np.lib.stride_tricks.as_strided(
        buf, shape=(slices, rows, cols), strides=(sk * buf.itemsize, cols * buf.itemsize,
                                                  buf.itemsize))


def buffer_size(rows, cols, itemsize, slices=16):
    """Elements of a flat workspace for :func:`transform_buffer`."""
    return slices * k_stride(rows, cols, itemsize)


def input_transform(x, pad, v, serial=False):
    """x (N, C, H, W) C-contiguous -> V (16, C, N*th*tw) written into the
    :func:`transform_buffer` view ``v``; returns ``v``."""
    n, c, h, w = x.shape
    th, tw = tiles(h + 2 * pad[0] - 2, w + 2 * pad[1] - 2)
    if v.shape != (16, c, n * th * tw):
        raise ValueError(f"winograd input_transform: buffer {v.shape}, expected "
                         f"{(16, c, n * th * tw)}")
    sk = v.strides[0] // v.itemsize
    _run(_input_kernel, _input_serial, serial, n * c, 16 * c * n * th * tw,
         x.reshape(-1), n, c, h, w, pad[0], pad[1], th, tw, sk, _base(v))
    return v


def input_transform_adjoint(dv, x_shape, pad, out, serial=False):
    """dV (16, C, N*th*tw) (a :func:`transform_buffer` view) -> dx (N, C, H, W)
    written into ``out`` (C-contiguous)."""
    n, c, h, w = x_shape
    th, tw = tiles(h + 2 * pad[0] - 2, w + 2 * pad[1] - 2)
    sk = dv.strides[0] // dv.itemsize
    _run(_input_adjoint_kernel, _input_adjoint_serial, serial, n * c, 16 * c * n * th * tw,
         _base(dv), n, c, h, w, pad[0], pad[1], th, tw, sk, out.reshape(-1))
    return out


def output_transform(m, n, oh, ow, bias, out, serial=False):
    """M (16, C_out, N*th*tw) (a :func:`transform_buffer` view) -> y (N, C_out,
    OH, OW) + bias, written into ``out``."""
    c_out = m.shape[1]
    th, tw = tiles(oh, ow)
    if bias is None:
        bias = np.zeros(c_out, dtype=m.dtype)
    sk = m.strides[0] // m.itemsize
    _run(_output_kernel, _output_serial, serial, n * c_out, 16 * c_out * n * th * tw,
         _base(m), np.ascontiguousarray(bias, dtype=m.dtype),
         n, c_out, oh, ow, th, tw, sk, out.reshape(-1))
    return out


def output_transform_adjoint(dy, dm, serial=False):
    """dy (N, C_out, OH, OW) C-contiguous -> dM (16, C_out, N*th*tw) written into
    the :func:`transform_buffer` view ``dm``; returns (dm, the float64
    per-channel sums of dy (C_out,))."""
    n, c_out, oh, ow = dy.shape
    th, tw = tiles(oh, ow)
    if dm.shape != (16, c_out, n * th * tw):
        raise ValueError(f"winograd output_transform_adjoint: buffer {dm.shape}, "
                         f"expected {(16, c_out, n * th * tw)}")
    sums = np.empty(n * c_out, dtype=np.float64)
    sk = dm.strides[0] // dm.itemsize
    _run(_output_adjoint_kernel, _output_adjoint_serial, serial, n * c_out,
         16 * c_out * n * th * tw, dy.reshape(-1), n, c_out, oh, ow, th, tw, sk,
         _base(dm), sums)
    return dm, sums.reshape(n, c_out).sum(axis=0)


def _base(view):
    """The flat memory under a (slices, rows, cols) view whose slices are C-contiguous:
    a 1-D array starting at view[0, 0, 0] and long enough for every slice."""
    span = (view.shape[0] - 1) * (view.strides[0] // view.itemsize) + view[0].size
    return np.lib.stride_tricks.as_strided(view, shape=(span,), strides=(view.itemsize,))

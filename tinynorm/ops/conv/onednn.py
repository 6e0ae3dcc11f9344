"""The ``onednn`` plan: float32 CPU convolutions by Intel's oneDNN, through
its C API and :mod:`ctypes` (no compiled extension).

oneDNN is the library PyTorch's CPU convolutions run on: with channels-last
activations it picks its brgemm kernels (a batch-reduce GEMM over filter taps
and input-channel blocks, channel vectors contiguous), which fill whole
AVX-512 vectors at the 16-128 channels tinynorm's experiments train at, where
im2col + GEMM and Winograd on NCHW planes do not.  It is optional: the
``onednn-cpu-gomp`` wheel (PyPI, Intel's build of oneDNN 3.2 with the GNU
OpenMP runtime; ``pip install tinynorm[onednn]``) ships ``libdnnl.so.3``.
Without it, or for float64 (oneDNN has no float64 convolution), the
hand-written plans run; they stay the reference the tests hold this one to.

What it computes is the op contract's convolution (see :mod:`tinynorm.ops.conv`);
how: per geometry and memory layout, three primitives (forward training,
backward data, backward weights) are made once and cached.  The arrays are
described to oneDNN by their own strides, so an NCHW-shaped array in either
NCHW or channels-last memory (see :mod:`tinynorm.ops.layout`) is read in
place and the outputs come back in the input's layout.  The weights are
given in tinynorm's plain (C_out, C, kh, kw) layout; where the primitive
wants its own blocked weight layout, a cached reorder primitive converts the
weights per call (and the weight gradient back).  oneDNN's threads are
OpenMP's: ``OMP_NUM_THREADS`` (the trainer's single-threaded runs set it to 1).
The primitives are cached per process and run on the calling thread; they
are not meant to be run concurrently from several Python threads.

The constants below are the values of the C enums in oneDNN 3.2's headers
(``dnnl_types.h``, ``dnnl_common_types.h``); the C API is stable across 3.x.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

__all__ = ["status", "supports", "forward", "backward", "impl_names"]

# dnnl_data_type_t, dnnl_format_tag_t, dnnl_prop_kind_t, dnnl_alg_kind_t
_F32 = 3
_TAG_ANY = 1
_TAG_A = 2
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
# DNNL_ARG_*
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS = 1, 17, 33, 41
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS, _ARG_DIFF_BIAS = 129, 145, 161, 169
_ARG_FROM, _ARG_TO = 1, 17
# dnnl_query_t
_Q_IMPL_INFO_STR = 8
_Q_WEIGHTS_MD, _Q_DIFF_WEIGHTS_MD = 131, 132
_ENGINE_CPU = 1
_STREAM_DEFAULT_FLAGS = 1
_MAX_NDIMS = 12

_Dims = ctypes.c_int64 * _MAX_NDIMS   # dnnl_dims_t
_p = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _p)]


class OneDNNError(RuntimeError):
    """A oneDNN call returned an error status."""


def _library_path():
    """libdnnl.so.3: ``TINYNORM_DNNL_LIB``, else the onednn-cpu-gomp wheel's file."""
    path = os.environ.get("TINYNORM_DNNL_LIB")
    if path:
        return path
    import importlib.metadata as md
    for dist in ("onednn-cpu-gomp", "onednn"):
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            continue
        for f in files:
            if f.name == "libdnnl.so.3":
                return str(f.locate())
    return None


_lock = threading.Lock()
_state = {}          # "lib", "engine", "stream", "error" once loaded


def _load():
    """(lib, engine, stream) or raise OneDNNError naming why not."""
    with _lock:
        if "error" in _state:
            raise OneDNNError(_state["error"])
        if "lib" in _state:
            return _state["lib"], _state["engine"], _state["stream"]
        try:
            path = _library_path()
            if path is None:
                raise OneDNNError("oneDNN is not installed (pip install onednn-cpu-gomp)")
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                raise OneDNNError(f"libdnnl does not load: {e}") from None
            _declare(lib)
            engine, stream = _p(), _p()
            _check(lib.dnnl_engine_create(ctypes.byref(engine), _ENGINE_CPU, 0),
                   "dnnl_engine_create")
            _check(lib.dnnl_stream_create(ctypes.byref(stream), engine,
                                          _STREAM_DEFAULT_FLAGS), "dnnl_stream_create")
        except OneDNNError as e:
            _state["error"] = str(e)
            raise
        _state.update(lib=lib, engine=engine, stream=stream)
        return lib, engine, stream


_P = ctypes.POINTER(_p)
_D = ctypes.POINTER(ctypes.c_int64)
_I = ctypes.c_int
# name -> (restype, argtypes): every function this module calls, declared so
# that ctypes passes pointers as pointers (an undeclared int would be cut to 32 bits)
_SIGNATURES = {
    "dnnl_engine_create": (_I, [_P, _I, ctypes.c_size_t]),
    "dnnl_stream_create": (_I, [_P, _p, ctypes.c_uint]),
    "dnnl_stream_wait": (_I, [_p]),
    "dnnl_memory_desc_create_with_strides": (_I, [_P, _I, _D, _I, _D]),
    "dnnl_memory_desc_create_with_tag": (_I, [_P, _I, _D, _I, _I]),
    "dnnl_memory_desc_equal": (_I, [_p, _p]),
    "dnnl_memory_desc_get_size": (ctypes.c_size_t, [_p]),
    "dnnl_memory_create": (_I, [_P, _p, _p, _p]),
    "dnnl_memory_destroy": (_I, [_p]),
    "dnnl_convolution_forward_primitive_desc_create":
        (_I, [_P, _p, _I, _I, _p, _p, _p, _p, _D, _D, _D, _D, _p]),
    "dnnl_convolution_backward_data_primitive_desc_create":
        (_I, [_P, _p, _I, _p, _p, _p, _D, _D, _D, _D, _p, _p]),
    "dnnl_convolution_backward_weights_primitive_desc_create":
        (_I, [_P, _p, _I, _p, _p, _p, _p, _D, _D, _D, _D, _p, _p]),
    "dnnl_reorder_primitive_desc_create": (_I, [_P, _p, _p, _p, _p, _p]),
    "dnnl_primitive_desc_query": (_I, [_p, _I, _I, _p]),
    "dnnl_primitive_desc_query_md": (_p, [_p, _I, _I]),
    "dnnl_primitive_create": (_I, [_P, _p]),
    "dnnl_primitive_execute": (_I, [_p, _p, _I, ctypes.POINTER(_ExecArg)]),
}


def _declare(lib):
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def _check(code, what):
    if code != 0:
        raise OneDNNError(f"oneDNN: {what} failed with status {code}")


def status():
    """(True, "") when oneDNN loads, else (False, why)."""
    try:
        _load()
    except OneDNNError as e:
        return False, str(e)
    return True, ""


# ----------------------------------------------------------------------------
# memory descriptors and primitives
# ----------------------------------------------------------------------------

def _dims(values):
    d = _Dims()
    for i, v in enumerate(values):
        d[i] = int(v)
    return d


def _md_strided(lib, shape, strides):
    """A float32 memory descriptor of logical ``shape`` with element ``strides``."""
    md = _p()
    _check(lib.dnnl_memory_desc_create_with_strides(
        ctypes.byref(md), len(shape), _dims(shape), _F32, _dims(strides)),
        "dnnl_memory_desc_create_with_strides")
    return md


def _md_tag(lib, shape, tag):
    md = _p()
    _check(lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(shape), _dims(shape),
                                                _F32, tag), "dnnl_memory_desc_create_with_tag")
    return md


def _plain_strides(shape):
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


def _impl(lib, pd):
    s = ctypes.c_char_p()
    if lib.dnnl_primitive_desc_query(pd, _Q_IMPL_INFO_STR, 0, ctypes.byref(s)) != 0:
        return "?"
    return s.value.decode()


class _Reorder:
    """A cached reorder primitive src_md -> dst_md (weights to or from oneDNN's layout)."""

    def __init__(self, lib, engine, src_md, dst_md):
        pd, prim = _p(), _p()
        _check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src_md, engine,
                                                      dst_md, engine, None),
               "dnnl_reorder_primitive_desc_create")
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "reorder primitive")
        self.pd, self.prim, self.src_md, self.dst_md = pd, prim, src_md, dst_md


class _Primitives:
    """The three convolution primitives of one geometry and layout, plus the
    weight reorders each needs (None where it takes the plain layout)."""

    def __init__(self, key):
        lib, engine, _ = _load()
        x_shape, w_shape, stride, pad, out_hw, x_strides, y_strides, has_bias = key
        n, c_out = x_shape[0], w_shape[0]
        y_shape = (n, c_out, *out_hw)
        src = _md_strided(lib, x_shape, x_strides)
        dst = _md_strided(lib, y_shape, y_strides)
        w_plain = _md_tag(lib, w_shape, 5)          # dnnl_abcd: (C_out, C, kh, kw) as is
        w_any = _md_tag(lib, w_shape, _TAG_ANY)
        bias = _md_tag(lib, (c_out,), _TAG_A) if has_bias else None
        strides, dil = _dims(stride), _dims((0, 0))
        kh, kw = w_shape[2:]
        # oneDNN's right padding makes (H + pl + pr - kh) / s + 1 == OH exactly
        pr = [(out_hw[i] - 1) * stride[i] + (kh, kw)[i] - x_shape[2 + i] - pad[i]
              for i in range(2)]
        pad_l, pad_r = _dims(pad), _dims(pr)
        fwd, bwd_d, bwd_w = _p(), _p(), _p()
        _check(lib.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(fwd), engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, src, w_any,
            bias, dst, strides, dil, pad_l, pad_r, None), "convolution forward descriptor")
        _check(lib.dnnl_convolution_backward_data_primitive_desc_create(
            ctypes.byref(bwd_d), engine, _CONVOLUTION_DIRECT, src, w_any, dst, strides, dil,
            pad_l, pad_r, fwd, None), "convolution backward-data descriptor")
        _check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
            ctypes.byref(bwd_w), engine, _CONVOLUTION_DIRECT, src, w_any, bias, dst, strides,
            dil, pad_l, pad_r, fwd, None), "convolution backward-weights descriptor")
        self.pds = {"forward": fwd, "backward_data": bwd_d, "backward_weights": bwd_w}
        self.prims = {}
        for name, pd in self.pds.items():
            prim = _p()
            _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), f"{name} primitive")
            self.prims[name] = prim
        self.src, self.dst, self.bias, self.w_plain = src, dst, bias, w_plain
        # the weight layout each primitive chose, and the reorders to / from it
        self.w_md, self.w_reorder = {}, {}
        for name, query in (("forward", _Q_WEIGHTS_MD), ("backward_data", _Q_WEIGHTS_MD),
                            ("backward_weights", _Q_DIFF_WEIGHTS_MD)):
            md = lib.dnnl_primitive_desc_query_md(self.pds[name], query, 0)
            self.w_md[name] = md
            if lib.dnnl_memory_desc_equal(md, w_plain):
                self.w_reorder[name] = None
            elif name == "backward_weights":
                self.w_reorder[name] = _Reorder(lib, engine, md, w_plain)
            else:
                self.w_reorder[name] = _Reorder(lib, engine, w_plain, md)
        self.w_bytes = {name: lib.dnnl_memory_desc_get_size(md)
                        for name, md in self.w_md.items()}
        self.impl = {name: _impl(lib, pd) for name, pd in self.pds.items()}


_cache = {}


def _primitives(key):
    prims = _cache.get(key)
    if prims is None:
        prims = _cache[key] = _Primitives(key)
    return prims


def _elem_strides(a):
    """The element strides of ``a``'s layout, from its shape: channels-last or
    plain NCHW (the only two it is given).  Not ``a.strides``: NumPy may give a
    dimension of size 1 any stride."""
    from .. import layout
    if layout.is_channels_last(a):
        return layout.channels_last_strides(a.shape)
    if not a.flags.c_contiguous:
        raise ValueError("onednn: the array is neither C-contiguous nor channels-last")
    return _plain_strides(a.shape)


def _key(x, w, has_bias, plan, y_strides):
    return (tuple(x.shape), tuple(w.shape), plan.stride, plan.pad, plan.out_hw,
            _elem_strides(x), y_strides, has_bias)


def _execute(prim, args):
    """Run ``prim`` with [(DNNL_ARG_*, md, array or pointer), ...]."""
    lib, engine, stream = _load()
    mems = []
    try:
        arr = (_ExecArg * len(args))()
        for i, (arg, md, data) in enumerate(args):
            ptr = data if isinstance(data, int) else data.ctypes.data
            mem = _p()
            _check(lib.dnnl_memory_create(ctypes.byref(mem), md, engine, _p(ptr)),
                   "dnnl_memory_create")
            mems.append(mem)
            arr[i] = _ExecArg(arg, mem)
        _check(lib.dnnl_primitive_execute(prim, stream, len(args), arr),
               "dnnl_primitive_execute")
        _check(lib.dnnl_stream_wait(stream), "dnnl_stream_wait")
    finally:
        for mem in mems:
            lib.dnnl_memory_destroy(mem)


def _weights_for(prims, name, w):
    """w in the layout primitive ``name`` reads (a reordered copy or w itself)."""
    reorder = prims.w_reorder[name]
    if reorder is None:
        return w
    buf = np.empty(prims.w_bytes[name] // 4, dtype=np.float32)
    _execute(reorder.prim, [(_ARG_FROM, reorder.src_md, w), (_ARG_TO, reorder.dst_md, buf)])
    return buf


def out_strides(x, y_shape):
    """Element strides of the output: the input's layout (channels-last in,
    channels-last out), else plain NCHW."""
    from .. import layout
    if layout.is_channels_last(x):
        return layout.channels_last_strides(y_shape)
    return _plain_strides(y_shape)


def supports(x_shape, w_shape, dtype):
    """True where this plan can run: float32 and oneDNN loaded."""
    return np.dtype(dtype) == np.float32 and status()[0]


def forward(x, w, b, plan):
    """y (N, C_out, OH, OW) in x's layout."""
    from .. import layout
    y_shape = (x.shape[0], w.shape[0], *plan.out_hw)
    y = layout.empty_like_layout(x, y_shape)
    prims = _primitives(_key(x, w, b is not None, plan, _elem_strides(y)))
    w = np.ascontiguousarray(w)
    wk = _weights_for(prims, "forward", w)
    args = [(_ARG_SRC, prims.src, x), (_ARG_WEIGHTS, prims.w_md["forward"], wk),
            (_ARG_DST, prims.dst, y)]
    if b is not None:
        args.append((_ARG_BIAS, prims.bias, np.ascontiguousarray(b)))
    _execute(prims.prims["forward"], args)
    return y


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    """(dx, dw, db), each None when not asked for; dx in x's layout."""
    from .. import layout
    dy = layout.like(dy, x)                 # the forward's output layout (no copy if so)
    prims = _primitives(_key(x, w, need_db, plan, _elem_strides(dy)))
    dx = dw = db = None
    if need_dx:
        dx = layout.empty_like_layout(x, x.shape)
        wk = _weights_for(prims, "backward_data", np.ascontiguousarray(w))
        _execute(prims.prims["backward_data"],
                 [(_ARG_DIFF_DST, prims.dst, dy),
                  (_ARG_WEIGHTS, prims.w_md["backward_data"], wk),
                  (_ARG_DIFF_SRC, prims.src, dx)])
    if need_dw or need_db:
        dw = np.empty(w.shape, dtype=np.float32)
        reorder = prims.w_reorder["backward_weights"]
        dwk = dw if reorder is None else np.empty(prims.w_bytes["backward_weights"] // 4,
                                                  dtype=np.float32)
        args = [(_ARG_SRC, prims.src, x), (_ARG_DIFF_DST, prims.dst, dy),
                (_ARG_DIFF_WEIGHTS, prims.w_md["backward_weights"], dwk)]
        if prims.bias is not None:
            db = np.empty(w.shape[0], dtype=np.float32)
            args.append((_ARG_DIFF_BIAS, prims.bias, db))
        _execute(prims.prims["backward_weights"], args)
        if reorder is not None:
            _execute(reorder.prim, [(_ARG_FROM, reorder.src_md, dwk),
                                    (_ARG_TO, reorder.dst_md, dw)])
        if not need_dw:
            dw = None
    if not need_db:
        db = None
    return dx, dw, db


def impl_names(x, w, b, plan):
    """{primitive: oneDNN's implementation name} for this geometry and layout,
    e.g. {'forward': 'brg:avx512_core', ...} (what ran; for benchmarks)."""
    y_shape = (x.shape[0], w.shape[0], *plan.out_hw)
    return dict(_primitives(_key(x, w, b is not None, plan, out_strides(x, y_shape))).impl)

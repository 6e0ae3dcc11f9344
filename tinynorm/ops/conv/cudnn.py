"""The ``cudnn`` plan: GPU convolutions through cuDNN 9, by NVIDIA's cuDNN
frontend Python package (``pip install nvidia-cudnn-frontend``, imported as
``cudnn``; the ``cudnn`` extra of tinynorm).

NEVER RUN ON A GPU -- written against the frontend's documented graph API
(``cudnn.pygraph``) on machines without one.  CuPy 14 dropped
``cupyx.cudnn`` (and CuPy 13 builds only against cuDNN 7.6-8.9), so the
frontend is the maintained route to cuDNN 9 from Python; it takes raw device
pointers, which CuPy arrays give (``a.data.ptr``).

One graph per pass and geometry (x shape, w shape, stride, pad, dtype, TF32
policy, device), each built once and cached:

    forward   Y  = conv_fprop(image=X, weight=W)           cross-correlation
    backward  DX = conv_dgrad(loss=DY, filter=W)
              DW = conv_wgrad(image=X, loss=DY)

on packed NCHW tensors (strides (C*H*W, H*W, W, 1)) starting on 16-byte
boundaries (cuDNN's alignment; :func:`_aligned` copies a view that does not),
with dilation 1.  The build is ``validate -> build_operation_graph ->
create_execution_plans([A, FALLBACK]) -> [deselect numerical notes] ->
check_support -> build_plans``.
Execution runs on the cuDNN handle of the device, bound to CuPy's current
stream, with a workspace from CuPy's pool.

TF32.  For float32 data cuDNN may pick engines that round the inputs to TF32
(10-bit mantissa) on tensor cores.  Unless the ``allow_tf32`` setting is on,
engines carrying the TENSOR_CORE or DOWN_CONVERT_INPUTS numerical note are
deselected for float32 (the notes PyTorch filters when its
``allow_tf32`` is off); float64 never rounds its inputs (DOWN_CONVERT_INPUTS
is deselected for it always; FP64 tensor cores compute in full double).

Availability (:func:`status`): a usable GPU, ``import cudnn`` giving the
frontend (``cudnn.pygraph`` and ``cudnn.cudnnGraphNotSupportedError``) and a
cuDNN library of major version 9 or later.  A geometry whose graphs cuDNN
refuses with that error (:func:`supports`) takes the ``generic`` plan;
:func:`tinynorm.ops.conv` warns once per reason.  Any other error propagates.
"""
from __future__ import annotations

import importlib

import numpy as np

from ... import backend

__all__ = ["status", "available", "supports", "version", "forward", "backward"]

_state = {"module": None, "reason": None}
# (pass, geometry key) -> _Graph, or a str: why cuDNN refused that geometry
_graphs: dict = {}
_handles: dict = {}          # CUDA device id -> cudnn handle


def _frontend():
    """(module, "") when the frontend is usable, else (None, why not)."""
    if _state["reason"] is None:
        _state["module"], _state["reason"] = _load()
    return _state["module"], _state["reason"]


def _load():
    if not backend.gpu_available():
        return None, "no usable GPU (CuPy missing or cupy.is_available() false)"
    try:
        mod = importlib.import_module("cudnn")
    except Exception as e:  # ImportError, or libcudnn failing to load
        return None, (f"the cuDNN frontend does not import ({type(e).__name__}: {e}); "
                      f"pip install nvidia-cudnn-frontend and nvidia-cudnn-cu12 / -cu13")
    if not hasattr(mod, "pygraph"):
        return None, "the module 'cudnn' that imports is not NVIDIA's cuDNN frontend (no pygraph)"
    if not isinstance(getattr(mod, "cudnnGraphNotSupportedError", None), type):
        # supports() tells "cuDNN refuses this geometry" from a failure by this class
        return None, ("the cuDNN frontend has no cudnnGraphNotSupportedError (too old for the "
                      "cudnn plan; pip install -U nvidia-cudnn-frontend)")
    try:
        v = int(mod.backend_version())
    except Exception as e:  # noqa: BLE001 -- the library did not load
        return None, f"cudnn.backend_version() failed ({type(e).__name__}: {e})"
    if v < 90000:                    # cuDNN 9 numbers versions major*10000 + minor*100 + patch
        return None, f"cuDNN {v} is older than 9.0 (the cudnn plan needs cuDNN 9)"
    return mod, ""


def status():
    """``(available, reason)``: whether the ``cudnn`` plan can run, and why not."""
    mod, reason = _frontend()
    return mod is not None, reason


def available() -> bool:
    return status()[0]


def version() -> str:
    """The cuDNN library version the frontend loaded ("" when unavailable)."""
    mod, _ = _frontend()
    if mod is None:
        return ""
    try:
        return str(mod.backend_version_string())
    except Exception:  # noqa: BLE001 -- older frontends: the number
        return str(mod.backend_version())


def _handle(mod):
    device = backend.cupy.cuda.Device().id
    if device not in _handles:
        _handles[device] = mod.create_handle()
    return device, _handles[device]


def _packed(shape):
    """Strides (in elements) of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= int(s)
    return list(reversed(strides))


class _Graph:
    """A built graph, its tensors by role ("x", "w", "y", ...), its workspace size."""

    def __init__(self, graph, tensors):
        self.graph, self.tensors = graph, tensors
        self.workspace = int(graph.get_workspace_size())


def _types(mod, dtype):
    dtype = np.dtype(dtype)
    dt = {np.dtype(np.float32): mod.data_type.FLOAT, np.dtype(np.float64): mod.data_type.DOUBLE,
          np.dtype(np.float16): mod.data_type.HALF}.get(dtype)
    if dt is None:
        raise ValueError(f"cudnn: no cuDNN data type for {dtype}")
    compute = mod.data_type.DOUBLE if dtype == np.float64 else mod.data_type.FLOAT
    return dt, compute


def _build(mod, kind, key):
    """Build the graph of one pass (kind "fprop", "dgrad" or "wgrad")."""
    x_shape, w_shape, stride, pad, dtype_str, allow_tf32, _ = key
    dtype = np.dtype(dtype_str)
    dt, compute = _types(mod, dtype)
    n, _, h, w = x_shape
    c_out, _, kh, kw = w_shape
    y_shape = (n, c_out, (h + 2 * pad[0] - kh) // stride[0] + 1,
               (w + 2 * pad[1] - kw) // stride[1] + 1)
    _, handle = _handle(mod)
    g = mod.pygraph(io_data_type=dt, intermediate_data_type=compute,
                    compute_data_type=compute, handle=handle)
    geometry = dict(padding=list(pad), stride=list(stride), dilation=[1, 1],
                    compute_data_type=compute)

    def tensor(name, shape):
        return g.tensor(name=name, dim=list(shape), stride=_packed(shape), data_type=dt)

    def output(t, shape):
        t.set_output(True).set_dim(list(shape)).set_stride(_packed(shape)).set_data_type(dt)
        return t

    if kind == "fprop":
        x, wt = tensor("x", x_shape), tensor("w", w_shape)
        tensors = dict(x=x, w=wt, y=output(g.conv_fprop(image=x, weight=wt, **geometry),
                                           y_shape))
    elif kind == "dgrad":
        dy, wt = tensor("dy", y_shape), tensor("w", w_shape)
        tensors = dict(dy=dy, w=wt, dx=output(g.conv_dgrad(loss=dy, filter=wt, **geometry),
                                              x_shape))
    else:
        x, dy = tensor("x", x_shape), tensor("dy", y_shape)
        tensors = dict(x=x, dy=dy, dw=output(g.conv_wgrad(image=x, loss=dy, **geometry),
                                             w_shape))
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([mod.heur_mode.A, mod.heur_mode.FALLBACK])
    # deselect before check_support / build_plans: the filter acts on the candidate plans
    notes = [mod.numerical_note.DOWN_CONVERT_INPUTS]
    if dtype == np.float32 and not allow_tf32:
        notes.append(mod.numerical_note.TENSOR_CORE)
    if dtype != np.float16:
        g.deselect_numeric_notes(notes)
    g.check_support()
    g.build_plans()
    return _Graph(g, tensors)


def _key(x_shape, w_shape, stride, pad, dtype, allow_tf32):
    device = backend.cupy.cuda.Device().id
    return (tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape), tuple(stride),
            tuple(pad), np.dtype(dtype).str, bool(allow_tf32 and np.dtype(dtype) == np.float32),
            device)


def supports(x_shape, w_shape, stride, pad, dtype, allow_tf32=False):
    """``(True, "")`` when cuDNN builds all three passes of this geometry (built
    once, cached), else ``(False, why)``.  Needs :func:`available`.

    Only the frontend's own refusal, ``cudnn.cudnnGraphNotSupportedError`` (its
    GRAPH_NOT_SUPPORTED, HEURISTIC_QUERY_FAILED, UNSUPPORTED_GRAPH_FORMAT and
    plan-creation failures), means "not supported": anything else -- a
    TypeError or AttributeError from an API this code does not match, a
    ValueError from a graph described wrongly, a CUDA error -- propagates
    rather than being cached as a property of the geometry."""
    mod, reason = _frontend()
    if mod is None:
        return False, reason
    key = _key(x_shape, w_shape, stride, pad, dtype, allow_tf32)
    for kind in ("fprop", "dgrad", "wgrad"):
        entry = _graphs.get((kind, key))
        if entry is None:
            try:
                entry = _build(mod, kind, key)
            except mod.cudnnGraphNotSupportedError as e:
                entry = (f"cuDNN does not support the {kind} of x {key[0]}, w {key[1]}, "
                         f"stride {key[2]}, pad {key[3]}, {np.dtype(dtype).name}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _graphs[(kind, key)] = entry
        if isinstance(entry, str):
            return False, entry
    return True, ""


# cuDNN requires every tensor's device pointer to be 16-byte aligned.  CuPy's pool
# hands out 512-byte aligned blocks, but a view into one (x[1:], a slice of a
# concatenated batch) can start anywhere.
ALIGNMENT = 16


def _aligned(a):
    """``a`` C-contiguous and starting on an ALIGNMENT-byte boundary; a copy only
    when it is not already both."""
    a = backend.cupy.ascontiguousarray(a)
    if a.data.ptr % ALIGNMENT:
        a = a.copy()             # a fresh allocation from the pool: aligned
    return a


def _run(kind, plan, buffers):
    """Execute the cached graph of ``kind`` for ``plan`` on ``buffers`` (role -> CuPy
    array, each :func:`_aligned` or fresh from ``cp.empty``)."""
    mod, _ = _frontend()
    cp = backend.cupy
    key = _key(plan.x_shape, plan.w_shape, plan.stride, plan.pad, plan.dtype, plan.tf32)
    entry = _graphs[(kind, key)]           # built when the plan was made (supports)
    _, handle = _handle(mod)
    mod.set_stream(handle=handle, stream=cp.cuda.get_current_stream().ptr)
    workspace = cp.empty(max(entry.workspace, 1), dtype=cp.uint8)
    pack = {entry.tensors[role]: int(array.data.ptr) for role, array in buffers.items()}
    entry.graph.execute(pack, int(workspace.data.ptr), handle=handle)
    # workspace goes back to CuPy's pool here; the pool is ordered on this stream


def forward(x, w, b, plan):
    cp = backend.cupy
    x, w = _aligned(x), _aligned(w)
    y = cp.empty((x.shape[0], w.shape[0], *plan.out_hw), dtype=x.dtype)
    _run("fprop", plan, {"x": x, "w": w, "y": y})
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def backward(dy, x, w, plan, need_dx, need_dw, need_db):
    cp = backend.cupy
    dy = _aligned(dy)
    dx = dw = None
    if need_dx:
        dx = cp.empty(x.shape, dtype=x.dtype)
        _run("dgrad", plan, {"dy": dy, "w": _aligned(w), "dx": dx})
    if need_dw:
        dw = cp.empty(w.shape, dtype=w.dtype)
        _run("wgrad", plan, {"x": _aligned(x), "dy": dy, "dw": dw})
    db = dy.sum(axis=(0, 2, 3)) if need_db else None
    return dx, dw, db

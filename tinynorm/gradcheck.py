"""Public finite-difference gradient checker.

Point it at any forward/backward pair that follows the op contract::

    y, cache = forward(*args)
    grads    = backward(dy, cache)     # one per argument; None skips one

or at a layer (``forward(x) -> y``, ``backward(dy) -> dx``, ``params`` and
``grads`` dicts)::

    from tinynorm.gradcheck import gradcheck, gradcheck_layer
    gradcheck(my_norm_forward, my_norm_backward, x, gamma, beta, 1e-5)
    gradcheck_layer(MyNormLayer(16), x)

What is checked.  The scalar objective is ``L = sum(y * r)`` with a fixed
random ``r`` (so the backward gets ``dy = r``).  Every floating-point array
argument that the backward returns a gradient for is compared against central
differences in float64:

* arrays with at most ``max_elementwise`` elements, element by element:
  ``n_i = sum((y(x + h e_i) - y(x - h e_i)) * r) / 2h``;
* larger arrays along ``n_directions`` random unit directions ``d``:
  ``sum((y(x + h d) - y(x - h d)) * r) / 2h`` against ``<grad, d>``.

The outputs are subtracted *before* the dot product with ``r``, so entries the
perturbation does not reach cancel exactly and do not add round-off.

Error measure (cs231n's ``rel_error`` with a floor).  Element-wise:
``|a_i - n_i| / max(|a_i| + |n_i|, 1e-3 * max_j(|a_j| + |n_j|))`` -- entries
a thousand times smaller than the largest one are measured against that
floor, because finite differences cannot resolve them relatively.  Directional:
``|a - n| / max(|a| + |n|, 1e-3 * ||grad||)`` (for a unit direction
``|<grad, d>| <= ||grad||``; the floor covers directions nearly orthogonal to
the gradient).  A check passes when the largest error is
``<= rtol`` (default 1e-6), or where the absolute difference is ``<= atol``
(default 0).

Inputs are converted to float64 copies; keep them away from kinks (ReLU at 0,
ties in max pooling), where finite differences are not defined.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, is_array, to_numpy

__all__ = ["gradcheck", "gradcheck_layer", "GradcheckError", "GradResult", "rel_error",
           "format_table"]


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with finite differences."""


@dataclass
class GradResult:
    name: str            # argument or parameter name
    mode: str            # "elementwise" or "directional"
    max_rel_error: float
    passed: bool
    worst: object = None  # index of the worst element, or the direction number
    analytic: float = float("nan")
    numeric: float = float("nan")
    op: str = ""
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        where = (f"element {self.worst}" if self.mode == "elementwise"
                 else f"random direction #{self.worst}")
        return (f"{self.op + ': ' if self.op else ''}gradient of '{self.name}' "
                f"{'passes' if self.passed else 'FAILS'} ({self.mode}): worst at {where}: "
                f"analytic {self.analytic:.10g}, numeric {self.numeric:.10g}, "
                f"relative error {self.max_rel_error:.3g}")


def rel_error(a, b) -> float:
    """cs231n's measure: max |a - b| / max(|a| + |b|, 1e-300)."""
    a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-300)))


def _rng(seed):
    # a stream of its own: a user who draws the inputs from default_rng(seed)
    # must not get r == x (for BN, dy proportional to x_hat has dx = 0 exactly)
    return np.random.default_rng([seed, 0x6A1E5])


def _as_float64(a):
    if is_array(a) and a.dtype.kind == "f":
        xp = get_array_module(a)
        return xp.array(a, dtype=xp.float64, copy=True)
    return a


def _compare_elementwise(name, analytic, numeric, rtol, atol, op):
    a = np.asarray(to_numpy(analytic), np.float64).ravel()
    n = np.asarray(to_numpy(numeric), np.float64).ravel()
    mag = np.abs(a) + np.abs(n)
    floor = max(1e-3 * float(mag.max(initial=0.0)), 1e-300)
    err = np.abs(a - n) / np.maximum(mag, floor)
    # elements within atol pass whatever their relative error
    judged = np.where(np.abs(a - n) <= atol, 0.0, err)
    i = int(np.argmax(judged)) if err.size else 0
    worst = np.unravel_index(i, np.shape(analytic)) if err.size else ()
    e = float(err[i]) if err.size else 0.0
    return GradResult(name, "elementwise", e, float(judged[i]) <= rtol if err.size else True,
                      tuple(int(k) for k in worst),
                      float(a[i]) if a.size else 0.0, float(n[i]) if n.size else 0.0, op)


def _check_array(name, arr, analytic, eval_output, r, *, eps, rtol, atol, max_elementwise,
                 n_directions, rng, op):
    """Compare ``analytic`` (gradient of sum(y*r) wrt ``arr``) with finite differences.

    ``arr`` is perturbed in place and restored; ``eval_output()`` recomputes y.
    """
    if not hasattr(analytic, "shape"):
        # e.g. a list where an array belongs: name it instead of an AttributeError
        raise GradcheckError(f"{op + ': ' if op else ''}gradient of '{name}' is a "
                             f"{type(analytic).__name__}, not an array; return a NumPy or CuPy "
                             f"array of the argument's shape {tuple(arr.shape)}")
    xp = get_array_module(arr)
    if tuple(analytic.shape) != tuple(arr.shape):
        raise GradcheckError(f"{op + ': ' if op else ''}gradient of '{name}' has shape "
                             f"{tuple(analytic.shape)} but the argument has shape {tuple(arr.shape)}")
    original = arr.copy()

    def directional(direction):
        arr[...] = original + eps * direction
        y_plus = xp.array(eval_output(), dtype=xp.float64, copy=True)
        arr[...] = original - eps * direction
        y_minus = xp.array(eval_output(), dtype=xp.float64, copy=True)
        arr[...] = original
        return float(((y_plus - y_minus) * r).sum()) / (2 * eps)

    if arr.size <= max_elementwise:
        numeric = np.zeros(arr.size)
        for i in range(arr.size):
            # by index, not through arr.reshape(-1): that is a copy for an argument
            # in another memory layout (a transpose, channels-last), which keeps it
            idx = np.unravel_index(i, arr.shape)
            v = arr[idx].copy()
            arr[idx] = v + eps
            y_plus = xp.array(eval_output(), dtype=xp.float64, copy=True)
            arr[idx] = v - eps
            y_minus = xp.array(eval_output(), dtype=xp.float64, copy=True)
            arr[idx] = v
            numeric[i] = float(((y_plus - y_minus) * r).sum()) / (2 * eps)
        return _compare_elementwise(name, analytic, numeric.reshape(arr.shape), rtol, atol, op)

    worst = None
    grad = xp.asarray(analytic, dtype=xp.float64)
    # |<g, d>| <= ||g|| for a unit d; a direction nearly orthogonal to g is
    # measured against 1e-3 ||g||, like the element-wise floor
    floor = max(1e-3 * float(xp.sqrt((grad * grad).sum())), 1e-300)
    for k in range(n_directions):
        d = rng.standard_normal(arr.shape)
        d /= np.linalg.norm(d)
        d_x = xp.asarray(d)
        a = float((grad * d_x).sum())
        n = directional(d_x)
        e = abs(a - n) / max(abs(a) + abs(n), floor)
        if worst is None or e > worst.max_rel_error:
            worst = GradResult(name, "directional", e, e <= rtol or abs(a - n) <= atol, k, a, n, op)
    return worst


def _finish(results, raise_on_fail):
    failed = [res for res in results if not res.passed]
    if failed and raise_on_fail:
        raise GradcheckError("\n".join(res.describe() for res in failed))
    return results


def gradcheck(forward, backward, *args, kwargs=None, names=None, eps=1e-6, rtol=1e-6, atol=0.0,
              max_elementwise=256, n_directions=6, seed=0, raise_on_fail=True, op=""):
    """Check ``backward`` against central finite differences of ``forward``.

    Parameters
    ----------
    forward : callable ``forward(*args, **kwargs) -> (y, cache)``
    backward : callable ``backward(dy, cache) -> grad, or a tuple or list of
        grads``; the i-th gradient belongs to the i-th positional argument.
        ``None`` gradients, and gradients of ``None`` or non-float arguments,
        are skipped.  A float array argument without a gradient (the backward
        returned fewer) raises :class:`GradcheckError` naming it.
    *args : the forward's positional arguments.  Float arrays are copied to
        float64; everything else is passed unchanged.
    names : names of the positional arguments, for the report (default
        ``arg0, arg1, ...``).
    eps : finite-difference step ``h``.
    rtol : largest accepted relative error (see the module docstring).
    atol : an element (or direction) whose analytic and numeric values differ
        by at most ``atol`` passes whatever its relative error.  Default 0;
        needed only where a gradient is zero by construction (e.g. BN's beta
        feeding another BN), which finite differences see as round-off.
    max_elementwise : arrays with more elements are checked along
        ``n_directions`` random directions instead of element by element.
    raise_on_fail : raise :class:`GradcheckError` naming every failing
        argument, its worst element or direction, both values and the error.

    Returns the list of :class:`GradResult`, one per checked argument.
    """
    kwargs = dict(kwargs or {})
    args = [_as_float64(a) for a in args]
    names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    rng = _rng(seed)

    y, cache = forward(*args, **kwargs)
    xp = get_array_module(y) if is_array(y) else np
    r = xp.asarray(rng.standard_normal(np.shape(y)))
    grads = backward(r if is_array(y) else float(r), cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    where = f"{op}: " if op else ""
    if len(grads) > len(args):
        raise GradcheckError(f"{where}backward returned {len(grads)} gradients for {len(args)} "
                             f"arguments")
    # a float array argument past the last returned gradient would silently go
    # unchecked (a backward returning only dx for (x, gamma, eps) used to pass)
    unchecked = [names[i] for i in range(len(grads), len(args))
                 if is_array(args[i]) and args[i].dtype.kind == "f"]
    if unchecked:
        raise GradcheckError(
            f"{where}backward returned {len(grads)} gradient(s) but the forward has floating-point "
            f"array argument(s) {', '.join(repr(n) for n in unchecked)} after them, which would "
            f"go unchecked; return a gradient for each (None to skip one on purpose)")

    def eval_output():
        return forward(*args, **kwargs)[0]

    results = []
    for i, g in enumerate(grads):
        a = args[i]
        if g is None or not is_array(a) or a.dtype.kind != "f":
            continue
        results.append(_check_array(names[i], a, g, eval_output, r, eps=eps, rtol=rtol, atol=atol,
                                    max_elementwise=max_elementwise,
                                    n_directions=n_directions, rng=rng, op=op))
    return _finish(results, raise_on_fail)


def gradcheck_layer(layer, x, *, eps=1e-6, rtol=1e-6, atol=0.0, max_elementwise=256, n_directions=6,
                    seed=0, raise_on_fail=True, check_input=True, op=""):
    """Check a layer's input gradient and every parameter gradient.

    ``layer`` needs ``forward(x) -> y``, ``backward(dy) -> dx`` and the dicts
    ``params`` / ``grads`` (name -> array; ``backward`` fills ``grads``).  Its
    parameters are converted to float64 in place (``layer.params[name]`` is
    replaced), so build the layer just for the check.  Use train mode for
    batch-statistics layers; layers with randomness (dropout) cannot be checked
    this way.
    """
    rng = _rng(seed)
    # every parameter of the layer and of its descendants, by full name
    owners = [(name, owner, key) for name, owner, key in _named_parameters(layer)]
    for _, owner, key in owners:
        owner.params[key] = _as_float64(owner.params[key])
    x = _as_float64(x)
    y = layer.forward(x)
    xp = get_array_module(y)
    r = xp.asarray(rng.standard_normal(y.shape))
    dx = layer.backward(r)
    # a non-array gradient is named by _check_array (no .copy() to fail on here)
    analytic = {name: owner.grads[key].copy() if hasattr(owner.grads[key], "shape")
                else owner.grads[key] for name, owner, key in owners}

    def eval_output():
        return layer.forward(x)

    results = []
    if check_input:
        results.append(_check_array("x", x, dx, eval_output, r, eps=eps, rtol=rtol, atol=atol,
                                    max_elementwise=max_elementwise,
                                    n_directions=n_directions, rng=rng, op=op))
    for name, owner, key in owners:
        results.append(_check_array(name, owner.params[key], analytic[name], eval_output, r,
                                    eps=eps, rtol=rtol, atol=atol, max_elementwise=max_elementwise,
                                    n_directions=n_directions, rng=rng, op=op))
    return _finish(results, raise_on_fail)


def _named_parameters(layer):
    """(full name, owning layer, key) of every parameter, for layers with
    ``named_parameters()`` (tinynorm.nn) or just a ``params`` dict."""
    if hasattr(layer, "named_parameters"):
        return list(layer.named_parameters())
    return [(key, layer, key) for key in layer.params]


def format_table(results) -> str:
    """A plain-text table: op, argument, mode, max relative error, pass/fail."""
    rows = [("op", "argument", "mode", "max rel error", "result")]
    rows += [(res.op, res.name, res.mode, f"{res.max_rel_error:.2e}",
              "pass" if res.passed else "FAIL") for res in results]
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

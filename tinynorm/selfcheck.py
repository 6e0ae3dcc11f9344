"""`tinynorm gradcheck`: every built-in op against finite differences.

Each public module (or package) of ``tinynorm.ops`` may define
``gradcheck_cases()`` returning a list of ``(op_label, forward, backward,
args, names)``; this module finds them all by itself, so a new op module is
checked as soon as it defines the function.
"""
from __future__ import annotations

import importlib
import pkgutil

import numpy as np

from .gradcheck import format_table, gradcheck, gradcheck_layer


def op_modules():
    """Names of the public modules of tinynorm.ops (private ones start with "_")."""
    from . import ops
    return sorted(m.name for m in pkgutil.iter_modules(ops.__path__)
                  if not m.name.startswith("_"))


def all_cases():
    cases = []
    for name in op_modules():
        mod = importlib.import_module(f"tinynorm.ops.{name}")
        if hasattr(mod, "gradcheck_cases"):
            cases.extend(mod.gradcheck_cases())
    return cases


def layer_cases():
    """(label, layer, input) for the stateful layers, float64, train mode."""
    from . import nn
    rng = np.random.default_rng(0)
    kw = dict(rng=rng, dtype=np.float64)
    x4 = rng.standard_normal((4, 3, 5, 5))
    x2 = rng.standard_normal((6, 5))
    # momentum 0 keeps the running statistics (and so r and d) fixed between the
    # forward passes of the finite differences; they are set so r and d clip in
    # every channel (unclipped, r and d depend on x but carry no gradient by design)
    renorm = nn.BatchRenorm(3, momentum=0.0, r_max=1.2, d_max=0.1, dtype=np.float64)
    renorm.buffers["running_mean"][...] = [0.3, -0.2, 1.0]
    renorm.buffers["running_var"][...] = [2.0, 0.5, 4.0]
    return [
        ("layer BatchNorm", nn.BatchNorm(3, dtype=np.float64), x4),
        ("layer BatchNorm chunk=2", nn.BatchNorm(3, chunk=2, dtype=np.float64), x4),
        ("layer BatchRenorm (r, d clipped)", renorm, x4),
        ("layer GroupNorm G=3", nn.GroupNorm(3, 3, dtype=np.float64), x4),
        ("layer WNConv2d", nn.WNConv2d(3, 4, 3, 1, 1, **kw), x4),
        ("layer WNLinear", nn.WNLinear(5, 4, **kw), x2),
        ("layer NormPropConv2d", nn.NormPropConv2d(3, 4, 3, 1, 1, **kw), x4),
        ("layer NormPropConv2d scale=1", nn.NormPropConv2d(3, 4, 3, 1, 1, scale=1.0, **kw), x4),
        ("layer NormPropLinear", nn.NormPropLinear(5, 4, **kw), x2),
        ("layer WNConv2d g_init=norm", nn.WNConv2d(3, 4, 3, 1, 1, g_init="norm", **kw), x4),
        ("layer TReLUConv2d", nn.TReLUConv2d(3, 4, 3, 1, 1, **kw), x4),
        ("layer ScaleShift", nn.ScaleShift(3, dtype=np.float64), x4),
    ]


def run_all(rtol=1e-6, extra_cases=()):
    """Run every op case and layer case; return the list of GradResult (never
    raises on failure)."""
    results = []
    for label, forward, backward, args, names in list(all_cases()) + list(extra_cases):
        results.extend(gradcheck(forward, backward, *args, names=names, rtol=rtol,
                                 raise_on_fail=False, op=label))
    for label, layer, x in layer_cases():
        results.extend(gradcheck_layer(layer, x, rtol=rtol, raise_on_fail=False, op=label))
    return results


def main(rtol=1e-6) -> int:
    results = run_all(rtol)
    print(format_table(results))
    n_fail = sum(not r.passed for r in results)
    print(f"\n{len(results) - n_fail}/{len(results)} gradients pass (rtol {rtol:g}, float64)")
    return 1 if n_fail else 0

"""`tinynorm gradcheck`: every op, layer and unit against finite differences.

Each public module (or package) of ``tinynorm.ops`` may define
``gradcheck_cases()`` returning a list of ``(op_label, forward, backward,
args, names)``, and each public module of ``tinynorm.nn`` one returning
``(label, layer, input)``; this module finds them all by itself, so a new
module is checked as soon as it defines the function.  The units of every
registered normalization are checked as the models build them
(:func:`tinynorm.norms.gradcheck_cases`), a norm registered by the user
included.
"""
from __future__ import annotations

import importlib
import pkgutil


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


def nn_modules():
    """Names of the public modules of tinynorm.nn."""
    from . import nn
    return sorted(m.name for m in pkgutil.iter_modules(nn.__path__)
                  if not m.name.startswith("_"))


def layer_cases():
    """(label, layer, input), float64, train mode: each public module of
    tinynorm.nn that defines ``gradcheck_cases()`` (its layers), then the units
    of every registered norm as the models build them (:mod:`tinynorm.norms`),
    so a gradient check of a unit is a check of what trains."""
    from . import norms
    cases = []
    for name in nn_modules():
        mod = importlib.import_module(f"tinynorm.nn.{name}")
        if hasattr(mod, "gradcheck_cases"):
            cases.extend(mod.gradcheck_cases())
    return cases + norms.gradcheck_cases()


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

"""`tinynorm gradcheck`: every built-in op against finite differences.

Each op module may define ``gradcheck_cases()`` returning a list of
``(op_label, forward, backward, args, names)``; this module collects them.
"""
from __future__ import annotations

import importlib

from .gradcheck import format_table, gradcheck

OP_MODULES = ["conv", "linear", "activations", "pooling", "loss", "dropout", "batchnorm",
              "weightnorm", "normprop", "trelu", "layernorm"]


def all_cases():
    cases = []
    for name in OP_MODULES:
        mod = importlib.import_module(f"tinynorm.ops.{name}")
        if hasattr(mod, "gradcheck_cases"):
            cases.extend(mod.gradcheck_cases())
    return cases


def run_all(rtol=1e-6, extra_cases=()):
    """Run every case; return the list of GradResult (never raises on failure)."""
    results = []
    for label, forward, backward, args, names in list(all_cases()) + list(extra_cases):
        results.extend(gradcheck(forward, backward, *args, names=names, rtol=rtol,
                                 raise_on_fail=False, op=label))
    return results


def main(rtol=1e-6) -> int:
    results = run_all(rtol)
    print(format_table(results))
    n_fail = sum(not r.passed for r in results)
    print(f"\n{len(results) - n_fail}/{len(results)} gradients pass (rtol {rtol:g}, float64)")
    return 1 if n_fail else 0

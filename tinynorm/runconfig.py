"""Checks of a training run's configuration, one table row per key of ``train.DEFAULTS``.

Every value is type- and range-checked before any data loads, so a mistake is a
one-line :class:`ConfigError` naming the key instead of an epoch of training
followed by a crash (or, worse, a run that silently did something else: a TOML
``augment = "no"`` is a non-empty string, so it used to mean True).

``SPECS`` maps each key to ``(check, on_resume)``:

* ``check(key, value)`` returns the value normalized (an int given for a float
  key becomes a float, so the logged configuration is what ran) or raises
  :class:`ConfigError`;
* ``on_resume`` is ``"allowed"`` for the few keys that may change when a run is
  resumed (they do not change what the run computes, or only extend it) and
  ``"fixed"`` for every other key: changing one of those on resume would make
  a different run under the same name, so it is refused.

Adding a key to ``DEFAULTS`` means adding one row here; ``tests/test_faults.py``
fails while a key of ``DEFAULTS`` has no row.  Rows for keys that ``DEFAULTS``
does not hold are never used.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["ConfigError", "SPECS", "RESUME_ALLOWED", "validate", "resume_changes"]


class ConfigError(ValueError):
    """A configuration value of the wrong type or outside its range."""


# -- the checks (small closures; each names the key and the offending value) --------------

def _fail(key, want, value):
    raise ConfigError(f"configuration key {key!r} must be {want}, got {value!r}")


def integer(lo=None, none=False):
    """An int (not a bool, not 32.5, not "32") >= lo; None too when ``none``."""
    want = "an integer" + (f" >= {lo}" if lo is not None else "") + (" or unset" if none else "")

    def check(key, value):
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(key, want, value)
        if lo is not None and value < lo:
            _fail(key, want, value)
        return int(value)
    return check


def real(gt=None, ge=None, lt=None, none=False):
    """A finite number (int or float, not a bool) in the given open/closed bounds."""
    bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
              f"< {lt}" if lt is not None else ""]
    want = "a finite number" + (" " + " and ".join(b for b in bounds if b) if any(bounds)
                                else "") + (" or unset" if none else "")

    def check(key, value):
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            _fail(key, want, value)
        if (gt is not None and not value > gt) or (ge is not None and not value >= ge) \
                or (lt is not None and not value < lt):
            _fail(key, want, value)
        return float(value)
    return check


def boolean(key, value):
    """true or false (TOML booleans); "no", 0 and 1 are refused, not guessed."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    _fail(key, "true or false", value)


def text(none=False):
    def check(key, value):
        if value is None and none:
            return None
        if not isinstance(value, str) or not value:
            _fail(key, "a non-empty string" + (" or unset" if none else ""), value)
        return value
    return check


def choice(options):
    """One of ``options``: a tuple, or a function returning one (read from the
    registries lazily, so a norm or model added there is accepted here)."""
    def check(key, value):
        known = tuple(options() if callable(options) else options)
        if value not in known:
            raise ConfigError(f"configuration key {key!r}: unknown value {value!r}; choose from "
                              f"{', '.join(map(str, known))}")
        return value
    return check


def _models():
    return ("cifar10_nv", "resnet50", "deep_linear")     # models.build_model's names


def _norms():
    from .norms import norm_names     # the registry: a norm registered later counts
    return norm_names()


def _datasets():
    from .datasets import _ALIASES, DATASETS
    return tuple(DATASETS) + tuple(_ALIASES)


def _inits():
    from .nn.init import INITS
    return tuple(INITS)


def _wn_g_inits():
    from .nn import WN_G_INITS
    return tuple(WN_G_INITS)


def residual_scale(key, value):
    """"auto" (the norm's own scale) or a finite number > 0."""
    if value == "auto":
        return value
    return real(gt=0)(key, value) if not isinstance(value, str) else \
        _fail(key, '"auto" or a finite number > 0', value)


def _schedules():
    from .optim import LRSchedule
    return LRSchedule.KINDS


ALLOWED, FIXED = "allowed", "fixed"

# key -> (check, on_resume).  One row per key of tinynorm.train.DEFAULTS.
SPECS = {
    "model": (choice(_models), FIXED),
    "norm": (choice(_norms), FIXED),
    "init": (choice(_inits), FIXED),
    "wn_g_init": (choice(_wn_g_inits), FIXED),
    "normprop_scale": (real(gt=0), FIXED),
    "residual_scale": (residual_scale, FIXED),
    "dataset": (choice(_datasets), FIXED),
    "data_root": (text(none=True), ALLOWED),      # where the same files are read from
    "width": (real(gt=0), FIXED),
    "stem": (choice(("cifar", "imagenet")), FIXED),
    "bn_chunk": (integer(1, none=True), FIXED),
    "depth": (integer(2), FIXED),
    "linear_width": (integer(1), FIXED),
    "epochs": (integer(1), ALLOWED),              # more epochs: the schedule is re-spanned
    "max_iters": (integer(1, none=True), ALLOWED),
    "batch_size": (integer(1), FIXED),
    "lr": (real(gt=0), FIXED),
    "schedule": (choice(_schedules), FIXED),
    "lr_final": (real(ge=0), FIXED),
    "power": (real(gt=0), FIXED),
    "warmup": (integer(0), FIXED),
    "momentum": (real(ge=0, lt=1), FIXED),
    "weight_decay": (real(ge=0), FIXED),
    "seed": (integer(0), FIXED),
    "train_limit": (integer(1, none=True), FIXED),
    "test_limit": (integer(1, none=True), FIXED),
    "augment": (boolean, FIXED),
    "crop": (integer(1), FIXED),
    "pad": (integer(0), FIXED),
    "min_std": (real(gt=0), FIXED),
    "flip": (boolean, FIXED),
    "ddi": (boolean, FIXED),
    "dropout": (real(ge=0, lt=1), FIXED),
    "dtype": (choice(("float32", "float64")), FIXED),
    "rank_timeout": (real(gt=0), ALLOWED),        # how long to wait, not what is computed
    "diverge_loss": (real(gt=0), FIXED),
    "track_norms_every": (integer(0), ALLOWED),   # 0: off
    "track_signal_every": (integer(0), ALLOWED),  # 0: off
    "eval_every": (integer(1), ALLOWED),
    "clean_eval_size": (integer(0), ALLOWED),     # what is evaluated, not what is trained
    "eval_batch_size": (integer(1), ALLOWED),
    "out": (text(), ALLOWED),                     # a moved run directory
    "progress": (boolean, ALLOWED),
    # the same computation elsewhere (float rounding may differ): a GPU run can be
    # resumed or evaluated on the CPU and back
    "device": (choice(("cpu", "gpu")), ALLOWED),
}

RESUME_ALLOWED = tuple(k for k, (_, on_resume) in SPECS.items() if on_resume == ALLOWED)


def validate(cfg: dict) -> dict:
    """Check every key that has a row in ``SPECS``; return a normalized copy.

    Raises :class:`ConfigError` (a ValueError) naming the first bad key.  Keys
    without a row pass unchecked (a test makes sure there are none).
    """
    out = dict(cfg)
    for key, value in cfg.items():
        if key in SPECS:
            out[key] = SPECS[key][0](key, value)
    if out.get("dropout") and out.get("model") != "resnet50":
        raise ConfigError(f"configuration key 'dropout' applies to resnet50 (before its "
                          f"classifier); model {out.get('model')!r} has no dropout")
    return out


def resume_changes(saved: dict, requested: dict, *, where: str = "the checkpoint"):
    """The changes ``requested`` makes to a run's ``saved`` configuration.

    Returns ``[(key, old, new), ...]`` for the allowed keys whose value differs;
    raises :class:`ConfigError` naming the first key that may not change on
    resume (a key without a row in ``SPECS`` counts as one that may not).
    """
    changes = []
    for key, new in requested.items():
        old = saved.get(key)
        if old == new:
            continue
        if SPECS.get(key, (None, FIXED))[1] != ALLOWED:
            raise ConfigError(
                f"cannot resume: {key} was {old!r} in {where} and would become {new!r}; a "
                f"resumed run keeps its configuration (only {', '.join(RESUME_ALLOWED)} may "
                f"change; start a new run in another directory, or pass --overwrite)")
        changes.append((key, old, new))
    return changes

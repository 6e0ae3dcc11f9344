"""A training run's configuration: one table, one row per key.

Each :class:`Key` row holds a key's default, its type and range check, whether
it may change when a run is resumed, its section and its help text.  Everything
else is derived from the table:

* :data:`DEFAULTS` (``tinynorm.train.DEFAULTS``), :func:`make_config`,
  :func:`validate` and :func:`resume_changes`;
* every flag of ``tinynorm train`` and ``tinynorm signal`` (``--batch-size``
  for ``batch_size``; a boolean key ``x`` is ``--x`` / ``--no-x``), the
  options of ``tinynorm profile`` (the ``model`` section, ``batch_size`` and
  ``device``) and the ``--resume`` help;
* :data:`RESUME_ALLOWED` and :data:`SPECS` (``key -> (check, on_resume)``);
* :class:`UnitOptions`, the keys that say how a model's units start (rows with
  ``unit=True``), which the norm registry hands to every unit it builds;
* :func:`upgrade_config`: a row's ``legacy`` value is what a log written before
  the norm registry (one without an ``init`` key) ran with.

A registered normalization adds rows of its own (``Norm.options``, see
:mod:`tinynorm.norms`): they become configuration keys, unit options and
command-line flags like the built-in ones.  Adding a key is adding one row.

Every value is type- and range-checked before any data loads, so a mistake is a
one-line :class:`ConfigError` naming the key instead of an epoch of training
followed by a crash (or, worse, a run that silently did something else: a TOML
``augment = "no"`` is a non-empty string, so it used to mean True).  A key that
may not change on resume would make a different run under the same name, so
changing it is refused.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable

from .nn.init import DEFAULT_INIT
from .ops.normprop import NORMPROP_SCALE

__all__ = ["ConfigError", "Key", "KEYS", "DEFAULTS", "SPECS", "RESUME_ALLOWED", "UnitOptions",
           "add_key", "remove_key", "make_config", "validate", "resume_changes", "upgrade_config",
           "unit_options", "keys", "SECTIONS", "check_batch_split"]


class ConfigError(ValueError):
    """A configuration value of the wrong type or outside its range."""

    def __init__(self, message, *, short=None):
        super().__init__(message)
        # the same fault without the "configuration key" frame (command-line options,
        # UnitOptions): "unknown norm 'x'; choose from ..." or "lr must be ..."
        self.short = short or message


# -- the checks (small closures; each names the key and the offending value) --------------
# A check has a ``parse`` attribute: how its command-line flag reads a string.

def _fail(key, want, value):
    raise ConfigError(f"configuration key {key!r} must be {want}, got {value!r}",
                      short=f"{key} must be {want}, got {value!r}")


def _parsed_by(parse):
    def mark(check):
        check.parse = parse
        return check
    return mark


def integer(lo=None, none=False):
    """An int (not a bool, not 32.5, not "32") >= lo; None too when ``none``."""
    want = "an integer" + (f" >= {lo}" if lo is not None else "") + (" or unset" if none else "")

    @_parsed_by(int)
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

    @_parsed_by(float)
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


@_parsed_by(bool)
def boolean(key, value):
    """true or false (TOML booleans); "no", 0 and 1 are refused, not guessed."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    _fail(key, "true or false", value)


def text(none=False):
    @_parsed_by(str)
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
    def known():
        return tuple(options() if callable(options) else options)

    @_parsed_by(str)
    def check(key, value):
        if value not in known():
            choices = ", ".join(map(str, known()))
            raise ConfigError(f"configuration key {key!r}: unknown value {value!r}; choose "
                              f"from {choices}",
                              short=f"unknown {key} {value!r}; choose from {choices}")
        return value
    check.choices = known
    return check


def _models():
    from .models import MODELS
    return MODELS


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


def _schedules():
    from .optim import LRSchedule
    return LRSchedule.KINDS


def auto_or_number(text_):
    return text_ if text_ == "auto" else float(text_)


@_parsed_by(auto_or_number)
def residual_scale(key, value):
    """"auto" (the norm's own scale) or a finite number > 0."""
    if value == "auto":
        return value
    return real(gt=0)(key, value) if not isinstance(value, str) else \
        _fail(key, '"auto" or a finite number > 0', value)


def _legacy_residual_scale(cfg):
    # ResNet's NormProp and TReLU WN blocks scaled the residual sum by 1/sqrt(2)
    if cfg.get("model") == "resnet50" and cfg.get("norm") in ("normprop", "trelu"):
        return 1.0 / math.sqrt(2.0)
    return MISSING


# -- the table ----------------------------------------------------------------------------

ALLOWED, FIXED = "allowed", "fixed"
MISSING = object()
# --help groups; ``tinynorm profile`` takes the "model" section (+ batch_size, device)
SECTIONS = {"model": "the model and its units", "data": "data and augmentation",
            "training": "optimization", "evaluation": "evaluation and records",
            "run": "the run"}


@dataclass(frozen=True)
class Key:
    """One configuration key.

    check(key, value) -> the value normalized (an int given for a float key
        becomes a float, so the logged configuration is what ran), or
        ConfigError; its ``parse`` attribute reads the command-line string
    resume: may the key change when a run is resumed (it does not change what
        the run computes, or only extends it)?
    unit: a unit option: handed to the norm registry's unit builders (``opts``)
    legacy: what a log written before the norm registry (no ``init``) ran with:
        a value, or a function of that log's configuration (MISSING: nothing)
    """
    name: str
    default: object
    check: Callable
    help: str = ""
    resume: bool = False
    section: str = "run"
    unit: bool = False
    legacy: object = MISSING

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def describe(self, default=MISSING):
        """The help text with the choices (read now, from the registries) and the
        default (the row's, or the one given)."""
        default = self.default if default is MISSING else default
        parts = [self.help] if self.help else []
        choices = getattr(self.check, "choices", None)
        if choices is not None:
            parts.append(" | ".join(map(str, choices())))
        if default is not None and self.check is not boolean:
            parts.append(f"default {default}")
        return "; ".join(parts)


def _k(name, default, check, help="", **kw):
    return Key(name, default, check, help, **kw)


M, D, T, E, R = "model", "data", "training", "evaluation", "run"
KEYS = {k.name: k for k in (
    _k("model", "cifar10_nv", choice(_models), "the network", section=M),
    _k("norm", "bn", choice(_norms), "the normalization (tinynorm.norms registry)", section=M),
    _k("init", DEFAULT_INIT, choice(_inits),
       "weight init (tinynorm.nn.init; caffe_xavier is the paper's Caffe filler)",
       section=M, unit=True, legacy="glorot"),
    _k("wn_g_init", "one", choice(_wn_g_inits),
       "WN gains start at 1 (one), at ||v|| (norm), or stay 1 (frozen)",
       section=M, unit=True, legacy="norm"),
    _k("normprop_scale", NORMPROP_SCALE, real(gt=0),
       "NormProp divides by this times ||W|| (1.0: the seed paper's formula)",
       section=M, unit=True, legacy=1.0),
    _k("residual_scale", "auto", residual_scale,
       "ResNet's act(s (branch + shortcut)): auto (the norm's own s) or a number",
       section=M, unit=True, legacy=_legacy_residual_scale),
    _k("dataset", "fashion-mnist", choice(_datasets), section=D),
    # where the same files are read from
    _k("data_root", None, text(none=True), "directory holding the data set files",
       resume=True, section=D),
    _k("width", 1.0, real(gt=0), "channel multiplier (cifar10_nv, resnet50)", section=M),
    _k("stem", "cifar", choice(("cifar", "imagenet")), "resnet50's stem", section=M),
    _k("bn_chunk", None, integer(1, none=True),
       "BN statistics per chunk of this many samples", section=M, unit=True),
    _k("bn_eps", 1e-5, real(gt=0), "BN's eps, added to the variance", section=M, unit=True),
    _k("depth", 50, integer(2), "deep_linear's depth", section=M),
    _k("linear_width", 64, integer(1), "deep_linear's hidden units", section=M),
    # more epochs: the schedule is re-spanned
    _k("epochs", 1, integer(1), "number of epochs", resume=True, section=T),
    _k("max_iters", None, integer(1, none=True),
       "stop after this many iterations (the schedule still spans epochs)",
       resume=True, section=T),
    _k("batch_size", 128, integer(1), "mini-batch size (the global batch under mpirun)",
       section=T),
    _k("lr", 0.01, real(gt=0), "initial learning rate", section=T),
    _k("schedule", "linear", choice(_schedules), "learning-rate schedule", section=T),
    _k("lr_final", 1e-5, real(ge=0), "final learning rate of linear/poly decay", section=T),
    _k("power", 2.0, real(gt=0), "power of the poly schedule", section=T),
    _k("warmup", 0, integer(0), "warm-up iterations", section=T),
    _k("momentum", 0.9, real(ge=0, lt=1), "SGD momentum", section=T),
    _k("weight_decay", 0.0, real(ge=0), "weight decay (w and v only)", section=T),
    _k("seed", 0, integer(0), "seed of init, data order and augmentation", section=T),
    _k("train_limit", None, integer(1, none=True),
       "use the first N of a seeded permutation of the training set", section=D),
    _k("test_limit", None, integer(1, none=True), "use N test images", section=D),
    _k("augment", True, boolean, "random crop (+ flip) for training, centre crop for test",
       section=D),
    _k("crop", 28, integer(1), "size of the (random) crop", section=D),
    _k("pad", 2, integer(0), "zero padding before the crop (Fashion-MNIST: 28 -> 32)",
       section=D),
    _k("min_std", 1.0, real(gt=0),
       "floor of the per-pixel std (grey levels) in the input normalizer", section=D),
    _k("flip", True, boolean, "random horizontal flips when augmenting", section=D),
    _k("ddi", False, boolean, "WN data-dependent init on the first batch", section=T),
    _k("dropout", 0.0, real(ge=0, lt=1),
       "resnet50: dropout with this p before the classifier (0: none)", section=M),
    _k("dtype", "float32", choice(("float32", "float64")),
       "parameters, activations, gradients", section=R),
    # how long to wait, not what is computed
    _k("rank_timeout", 600.0, real(gt=0),
       "under mpirun: abort all ranks when one is silent this many seconds",
       resume=True, section=R),
    _k("diverge_loss", 100.0, real(gt=0), "loss above which the run counts as diverged",
       section=T),
    _k("track_norms_every", 0, integer(0),
       "record ||output|| of the first and last layers every k iterations (0: off)",
       resume=True, section=E),
    _k("track_signal_every", 0, integer(0),
       "record every unit's output RMS/mean and every layer's weight coherence every k "
       "iterations (0: off)", resume=True, section=E),
    _k("eval_every", 1, integer(1), "evaluate on the test set every k epochs (and at the end)",
       resume=True, section=E),
    # what is evaluated, not what is trained
    _k("clean_eval_size", 10000, integer(0),
       "evaluate also on this many fixed training images, eval mode, no augmentation "
       "(train_top1_clean; 0: off)", resume=True, section=E),
    _k("eval_batch_size", 500, integer(1), "batch size of the evaluations", resume=True,
       section=E),
    # a moved run directory
    _k("out", "runs/default", text(), "run directory (log.h5, checkpoint.h5)", resume=True),
    _k("progress", True, boolean, "a progress bar (a plain line a minute off a terminal)",
       resume=True),
    # the same computation elsewhere (float rounding may differ): a GPU run can be
    # resumed or evaluated on the CPU and back
    _k("device", "cpu", choice(("cpu", "gpu")),
       "where the model, optimizer state and batches live", resume=True),
)}

BUILTIN = tuple(KEYS)

# derived, kept up to date by add_key (the same objects, so importers see new rows)
DEFAULTS: dict = {}
SPECS: dict = {}          # key -> (check, "allowed" | "fixed")


class _ResumeAllowed:
    """The keys that may change on resume, read from the table when used."""

    def _keys(self):
        return tuple(name for name, k in KEYS.items() if k.resume)

    def __iter__(self):
        return iter(self._keys())

    def __contains__(self, name):
        return name in self._keys()

    def __len__(self):
        return len(self._keys())

    def __repr__(self):
        return repr(self._keys())


RESUME_ALLOWED = _ResumeAllowed()


def _derive(key: Key):
    DEFAULTS[key.name] = key.default
    SPECS[key.name] = (key.check, ALLOWED if key.resume else FIXED)


for _key in KEYS.values():
    _derive(_key)


def add_key(key: Key, *, owner=None, replace=False) -> Key:
    """Add a row to the table (a registered norm's options come here).

    ``owner`` names who added it (e.g. the norm); a row of the same name may be
    replaced by its owner with ``replace=True``, never a built-in one."""
    if key.check(key.name, key.default) != key.default:
        raise ValueError(f"configuration key {key.name!r}: its default {key.default!r} is not "
                         f"a normalized value of its check")
    old = KEYS.get(key.name)
    if old is not None and (key.name in BUILTIN or not replace
                            or _OWNERS.get(key.name) != owner):
        raise ValueError(f"configuration key {key.name!r} already exists"
                         + (f" (added by {_OWNERS[key.name]!r})" if key.name in _OWNERS else ""))
    KEYS[key.name] = key
    _OWNERS[key.name] = owner
    _derive(key)
    return key


_OWNERS: dict = {}


def keys(section=None) -> tuple:
    """The rows (of one section), in the table's order."""
    return tuple(k for k in KEYS.values() if section is None or k.section == section)


# -- what is derived ------------------------------------------------------------------------

def make_config(overrides=None, base=None) -> dict:
    """DEFAULTS, then ``base`` (e.g. a TOML file), then ``overrides`` (flags).

    None leaves a key at its default unless the key may be unset (its default is None)."""
    cfg = dict(DEFAULTS)
    for layer in (base or {}), (overrides or {}):
        for key, value in layer.items():
            if key not in KEYS:
                raise KeyError(f"unknown configuration key {key!r}; known keys: "
                               f"{', '.join(sorted(KEYS))}")
            if value is not None or KEYS[key].default is None:
                cfg[key] = value
    return cfg


def validate(cfg: dict) -> dict:
    """Check every key that has a row; return a normalized copy.

    Raises :class:`ConfigError` (a ValueError) naming the first bad key.  Keys
    without a row pass unchecked (make_config refuses them).
    """
    out = dict(cfg)
    for key, value in cfg.items():
        if key in KEYS:
            out[key] = KEYS[key].check(key, value)
    if out.get("dropout") and out.get("model") != "resnet50":
        raise ConfigError(f"configuration key 'dropout' applies to resnet50 (before its "
                          f"classifier); model {out.get('model')!r} has no dropout")
    return out


def resume_changes(saved: dict, requested: dict, *, where: str = "the checkpoint"):
    """The changes ``requested`` makes to a run's ``saved`` configuration.

    Returns ``[(key, old, new), ...]`` for the allowed keys whose value differs;
    raises :class:`ConfigError` naming the first key that may not change on
    resume (a key without a row counts as one that may not).
    """
    changes = []
    for key, new in requested.items():
        old = saved.get(key)
        if old == new:
            continue
        if key not in KEYS or not KEYS[key].resume:
            raise ConfigError(
                f"cannot resume: {key} was {old!r} in {where} and would become {new!r}; a "
                f"resumed run keeps its configuration (only {', '.join(RESUME_ALLOWED)} may "
                f"change; start a new run in another directory, or pass --overwrite)")
        changes.append((key, old, new))
    return changes


def check_batch_split(cfg: dict, ranks: int) -> None:
    """ConfigError unless the global batch (and its BN chunks) split evenly over ``ranks``."""
    batch = cfg["batch_size"]
    if batch % ranks:
        raise ConfigError(
            f"batch_size {batch} is not divisible by the {ranks} ranks (batch_size is the "
            f"global batch; every rank takes batch_size / ranks samples)")
    chunk = cfg["bn_chunk"]
    if chunk and (batch // ranks) % chunk:
        raise ConfigError(
            f"bn_chunk {chunk} does not divide the {batch // ranks} samples of each of "
            f"the {ranks} ranks")


def upgrade_config(cfg: dict) -> dict:
    """A logged configuration as today's keys say it.

    Logs written before the norm registry have no ``init``: they ran with each
    row's ``legacy`` value (Glorot's init, WN gains started at ||v||, NormProp
    without its 1.21, ResNet's NormProp and TReLU WN blocks with the residual sum
    scaled by 1/sqrt(2)).  ``init = "xavier"`` meant Glorot's."""
    cfg = dict(cfg)
    if "init" not in cfg:
        for key in KEYS.values():
            value = key.legacy(cfg) if callable(key.legacy) else key.legacy
            if value is not MISSING:
                cfg.setdefault(key.name, value)
    if cfg.get("init") == "xavier":
        cfg["init"] = "glorot"
    return cfg


def unit_options(cfg: dict) -> dict:
    """The unit options of a configuration (the keys :class:`UnitOptions` holds)."""
    return {k.name: cfg[k.name] for k in KEYS.values() if k.unit and k.name in cfg}


class UnitOptions:
    """How the units of a model start: the configuration's unit keys (rows with
    ``unit=True``, a registered norm's options included), checked, read as
    attributes (``opts.init``); the others at their defaults.  Immutable:
    :meth:`replace` returns a changed copy."""

    __slots__ = ("_values",)

    def __init__(self, **values):
        rows = {k.name: k for k in KEYS.values() if k.unit}
        unknown = sorted(set(values) - set(rows))
        if unknown:
            raise TypeError(f"unknown unit option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(rows)}")
        checked = {}
        for name, row in rows.items():
            if name in values:
                try:
                    checked[name] = row.check(name, values[name])
                except ConfigError as e:
                    raise ValueError(e.short) from None
            else:
                checked[name] = row.default
        object.__setattr__(self, "_values", checked)

    def __getattr__(self, name):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"no unit option {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("UnitOptions is immutable; use .replace(...)")

    def replace(self, **changes) -> "UnitOptions":
        return UnitOptions(**dict(self._values, **changes))

    def asdict(self) -> dict:
        return dict(self._values)

    def __eq__(self, other):
        return isinstance(other, UnitOptions) and self._values == other._values

    def __hash__(self):
        return hash(tuple(sorted(self._values.items(), key=lambda kv: kv[0])))

    def __repr__(self):
        return "UnitOptions(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):                  # copy and pickle through the constructor
        return (_unit_options, (self._values,))


def _unit_options(values):
    return UnitOptions(**values)


def remove_key(name) -> None:
    """Remove a row that :func:`add_key` added (never a built-in one)."""
    if name in BUILTIN:
        raise ValueError(f"configuration key {name!r} is built in")
    KEYS.pop(name, None)
    _OWNERS.pop(name, None)
    DEFAULTS.pop(name, None)
    SPECS.pop(name, None)

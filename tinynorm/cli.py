"""The `tinynorm` command line.

    tinynorm gradcheck                 every built-in op against finite differences
    tinynorm train [--config F] ...    train one configuration (flags override the file)
    tinynorm eval RUN_DIR              evaluate a run's checkpoint on the test set
    tinynorm profile --model M ...     time per layer type of a training step (Figure 1)
    tinynorm signal [RUN_DIR] ...      RMS/mean of every unit's output on a real batch,
                                       and every layer's weight coherence
    tinynorm info                      versions (NumPy, CuPy, CUDA, cuDNN) and the
                                       convolution path a GPU run would take

train, eval, profile and signal take ``--device cpu|gpu`` (default cpu); asking
for a GPU where none is usable is a one-line error.

A mistake (a bad flag or configuration value, a missing file, a directory that
holds another run) is one line on stderr, ``tinynorm: error: ...``, and exit
status 2; a corrupt checkpoint exits with 1.  ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tomllib
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in the one-line ``tinynorm: error:`` form."""

    def error(self, message):
        sys.stderr.write(f"tinynorm: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


class _Terminated(BaseException):
    """SIGTERM/SIGHUP before training started (the trainer handles them once it runs)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _chw(text):
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"must be CxHxW with three positive integers "
                                         f"(e.g. 3x32x32), got {text!r}")
    return "x".join(map(str, dims))


def _cmd_gradcheck(args) -> int:
    from . import selfcheck
    return selfcheck.main(rtol=args.rtol)


def _config_flags(p, rows, *, checked=False, defaults=None):
    """One option per row of the run-configuration table (tinynorm.runconfig), in
    groups by section: ``--batch-size`` for ``batch_size``, ``--x`` / ``--no-x`` for
    a boolean key.  ``defaults``: the value of an option not given (None: the key is
    left out, so a TOML file or a resumed run's checkpoint decides).  ``checked``:
    the value is checked by the row here (a bad one is a usage error) rather than
    with the whole configuration later."""
    from .runconfig import SECTIONS, ConfigError, boolean
    groups = {}
    for row in rows:
        group = groups.get(row.section)
        if group is None:
            group = groups[row.section] = p.add_argument_group(SECTIONS[row.section])
        default = None if defaults is None else defaults[row.name]
        if row.check is boolean:
            group.add_argument(row.flag, dest=row.name, action=argparse.BooleanOptionalAction,
                               default=default, help=row.describe(*([] if defaults is None else [default])))
            continue
        parse = row.check.parse
        if checked:
            def parse(text, row=row, read=parse):
                try:
                    return row.check(row.name, read(text))
                except ConfigError as e:
                    raise argparse.ArgumentTypeError(e.short) from None
                except ValueError:
                    raise argparse.ArgumentTypeError(
                        f"invalid {read.__name__} value: {text!r}") from None
            parse.__name__ = row.check.parse.__name__
        group.add_argument(row.flag, dest=row.name, type=parse, default=default,
                           help=row.describe(*([] if defaults is None else [default])))


def _config_overrides(args) -> dict:
    """The configuration keys given on the command line."""
    from .runconfig import KEYS
    return {key: getattr(args, key) for key in KEYS if getattr(args, key, None) is not None}


# tinynorm profile: the model's keys, the batch and the device, with these defaults
PROFILE_KEYS = ("batch_size", "device")
PROFILE_DEFAULTS = dict(model="resnet50")


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    return data.get("train", data)


def _cmd_train(args) -> int:
    from .train import Trainer
    base = load_config_file(args.config) if args.config else {}
    overrides = _config_overrides(args)
    # on --resume the checkpoint's configuration is the base; what the file and the
    # flags give is checked against it (tinynorm.runconfig.RESUME_ALLOWED)
    trainer = Trainer(dict(base, **overrides), resume=args.resume, overwrite=args.overwrite)
    status = trainer.run()
    log = Path(trainer.cfg["out"]) / "log.h5"
    # every rank returns the same status; under mpirun rank 0 alone reports
    say = print if trainer.is_writer else (lambda *a, **k: None)
    reason = trainer.interrupted_reason
    if status == "diverged":
        say(f"run diverged at iteration {trainer.diverged_at} ({trainer.diverged_reason}); "
            f"log: {log}")
    elif status == "interrupted" and reason.startswith("SIG"):
        say(f"run interrupted by {reason} at iteration "
            f"{trainer.opt.iteration} (epoch {trainer.epoch + 1}, batch {trainer.batch} of "
            f"{trainer.data.batches_per_epoch}); checkpoint written; resume with: tinynorm "
            f"train --out {trainer.cfg['out']} --resume", flush=True)
        return 128 + getattr(signal, reason.split()[0], signal.SIGINT)
    elif status == "interrupted":
        say(f"run interrupted: {reason}; the last checkpoint written "
            f"is kept (resume with --resume once there is space)", flush=True)
        return 1
    else:
        say(f"run {status}; log: {log}")
    return 0


def _cmd_eval(args) -> int:
    from .runfiles import CHECKPOINT, read_checkpoint
    from .train import Trainer, evaluate
    run = Path(args.run)
    ckpt = run / CHECKPOINT if run.is_dir() else run
    ck = read_checkpoint(ckpt)                 # verified; the configuration comes from it
    cfg = dict(ck["config"], out=str(ckpt.parent), progress=False)
    if args.device is not None:                # e.g. a GPU run evaluated on the CPU
        cfg["device"] = args.device
    trainer = Trainer(cfg)
    trainer.load_checkpoint(ck)
    cfg = trainer.cfg
    loss, top1, top5 = evaluate(trainer.model, trainer.data.test_batches(cfg["eval_batch_size"]))
    print(f"{ckpt}: test loss {loss:.4f}  top-1 {top1:.2f}%  top-5 {top5:.2f}% "
          f"({len(trainer.data.test)} images)")
    clean = trainer.data.clean_train_batches(cfg["eval_batch_size"])
    if clean is not None:
        # eval mode, no augmentation: what a generalization gap is read from
        c_loss, c_top1, _ = evaluate(trainer.model, clean)
        print(f"{ckpt}: clean training loss {c_loss:.4f}  top-1 {c_top1:.2f}% "
              f"({len(trainer.data.train_clean)} training images, eval mode, no augmentation; "
              f"gap {c_top1 - top1:+.2f} points)")
    return 0


def _cmd_profile(args) -> int:
    import json

    import numpy as np

    from .backend import check_device, to_device
    from .models import build_model
    from .profile import format_profile, profile_step
    from .runconfig import unit_options
    device = check_device(args.device)         # before the model is built
    c, h, w = (int(v) for v in args.input.split("x"))
    model = build_model(args.model, args.norm, in_channels=c, num_classes=args.classes,
                        width=args.width, stem=args.stem, bn_chunk=args.bn_chunk,
                        depth=args.depth, linear_width=args.linear_width,
                        dropout=args.dropout, in_features=c * h * w,
                        opts=unit_options(vars(args))).to(device)
    rng = np.random.default_rng(0)
    x = to_device(rng.standard_normal((args.batch_size, c, h, w)).astype(np.float32), device)
    y = to_device(rng.integers(0, args.classes, args.batch_size), device)
    result = profile_step(model, x, y, steps=args.steps)
    print(f"{args.model} norm={args.norm} width={args.width} batch={args.batch_size} "
          f"input={args.input} device={device}")
    print(format_profile(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(vars(args), func=None, **result), indent=1))
    return 0


def _cmd_signal(args) -> int:
    import json

    from .diagnostics import format_signal, measure_signal, weight_coherences
    from .train import Trainer, make_config, read_log
    overrides = _config_overrides(args)
    if args.run:
        run = Path(args.run)
        ckpt = run / "checkpoint.h5" if run.is_dir() else run
        cfg = dict(read_log(ckpt.parent / "log.h5")["config"], out=str(ckpt.parent),
                   progress=False)
    else:
        try:
            cfg = make_config(dict(overrides, progress=False))
        except KeyError as e:
            raise SystemExit(f"tinynorm: {e.args[0]}") from None
    trainer = Trainer(cfg)
    where = "fresh model (initialization)"
    if args.run:
        trainer.load_checkpoint(ckpt)
        where = f"{ckpt} (iteration {trainer.opt.iteration})"
    from .backend import to_device
    x, _ = trainer.data.train_batch(0, 0)
    result = measure_signal(trainer.model, to_device(x, trainer.cfg["device"]))
    names, values = weight_coherences(trainer.model)
    print(f"{cfg['model']} norm={cfg['norm']} width={cfg['width']} init={cfg['init']} "
          f"wn_g_init={cfg['wn_g_init']} normprop_scale={cfg['normprop_scale']} "
          f"residual_scale={cfg['residual_scale']}; {where}; batch of {len(x)} "
          f"{cfg['dataset']} training images, train mode")
    print(format_signal(result))
    finite = [v for v in values if v == v]
    if finite:
        print(f"weight coherence over {len(values)} layers: min {min(finite):.3f}, "
              f"median {sorted(finite)[len(finite) // 2]:.3f}, max {max(finite):.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"config": cfg, "where": where, "signal": result,
             "coherence": {"name": names, "value": values}}, indent=1))
    return 0


def _cmd_info(args) -> int:
    from . import __version__, backend
    from .settings import current as current_settings
    from .ops.conv import cudnn
    v = backend.versions()
    print(f"tinynorm {__version__}")
    print(f"numpy {v['numpy']}, numba {v['numba']}")
    print(f"cupy {v['cupy']}")
    if v["gpu_unusable"]:
        print(f"GPU: not usable: {v['gpu_unusable']}")
    else:
        print(f"GPU: {v.get('gpu', '?')}; CUDA runtime {v.get('cuda_runtime', '?')}, "
              f"driver {v.get('cuda_driver', '?')}")
    ok, reason = cudnn.status()
    print(f"cuDNN: {cudnn.version()} (through the cuDNN frontend)" if ok
          else f"cuDNN: unavailable: {reason}")
    settings = current_settings()
    if v["gpu_unusable"]:
        path = "none (no GPU; CPU convolutions take the numba plans, see tinynorm.ops.conv_plan)"
    elif settings.force_generic or not settings.use_cudnn:
        path = "generic (im2col + matmul): " + ("force_generic is on" if settings.force_generic
                                                else "use_cudnn is off")
    elif ok:
        path = (f"cudnn (cuDNN frontend graphs), float32 "
                f"{'may use TF32' if settings.allow_tf32 else 'without TF32'}")
    else:
        path = f"generic (im2col + cupy.matmul): {reason}"
    print(f"GPU convolution path: {path}")
    from .parallel import describe
    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    # the run configuration's table, with the rows of every norm registered by now
    from .runconfig import DEFAULTS, KEYS, RESUME_ALLOWED, keys
    parser = _Parser(prog="tinynorm", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import MODULE first (e.g. one that registers "
                        "a normalization: tinynorm.norms.register_norm)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every built-in op's gradients (float64)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("train", help="train one configuration")
    p.add_argument("--config", help="TOML file with the run's keys (flags override it)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.h5 with its configuration (only "
                            + ", ".join(KEYS[k].flag[2:] for k in RESUME_ALLOWED)
                            + " may change)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT (without it a directory holding a run "
                            "is refused)")
    _config_flags(p, keys())
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set")
    p.add_argument("run", help="run directory or checkpoint.h5")
    p.add_argument("--device", default=None, help="cpu | gpu (default: the run's)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("profile", help="time per layer type of a training step (Figure 1)")
    p.add_argument("--classes", type=_positive_int, default=10)
    p.add_argument("--input", default="3x32x32", type=_chw, help="CxHxW")
    p.add_argument("--steps", type=_positive_int, default=3)
    p.add_argument("--json", help="also write the figures to this JSON file")
    _config_flags(p, keys("model") + tuple(KEYS[k] for k in PROFILE_KEYS), checked=True,
                  defaults=dict(DEFAULTS, **PROFILE_DEFAULTS))
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("signal", help="RMS and mean of every conv unit's and residual "
                                      "block's output on a real batch; weight coherence")
    p.add_argument("run", nargs="?", help="a run directory (or its checkpoint.h5); "
                                          "default: a fresh model from the flags")
    _config_flags(p, keys())
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.set_defaults(func=_cmd_signal)

    p = sub.add_parser("info", help="versions (NumPy, CuPy, CUDA, cuDNN) and the GPU "
                                    "convolution path")
    p.set_defaults(func=_cmd_info)

    for p in [parser, *sub.choices.values()]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    return parser


def _import_plugins(argv):
    """Import the modules named by ``--import MODULE`` (before the subcommand), e.g. a
    file that registers a normalization with tinynorm.norms.register_norm."""
    import importlib
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    sys.path.insert(0, "")      # as `python -m`: modules in the working directory
    try:
        for name in known.imports:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ValueError(f"--import {name}: {e}") from None
    finally:
        sys.path.remove("")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _import_plugins(argv)
    except ValueError as e:
        if "--debug" in argv:
            raise
        sys.stderr.write(f"tinynorm: error: {e}\n")
        return 2
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    # SIGTERM/SIGHUP before the trainer installs its own handlers: one line, no traceback
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        # an ignored signal stays ignored (nohup sets SIGHUP to SIG_IGN)
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) != signal.SIG_IGN:
            try:
                previous[name] = signal.signal(getattr(signal, name), _raise_terminated)
            except ValueError:          # not the main thread
                break
    try:
        if args.command in ("train", "eval", "profile", "signal"):
            from .backend import tune_allocator
            tune_allocator()   # keep freed activations in the heap: no page faults per step
        return args.func(args)
    except (KeyboardInterrupt, _Terminated) as e:
        if debug:
            raise
        signum = e.signum if isinstance(e, _Terminated) else signal.SIGINT
        when = " before training started; nothing was written" if args.command == "train" else ""
        sys.stderr.write(f"tinynorm: interrupted by {signal.Signals(signum).name}{when}\n")
        return 128 + signum
    except Exception as e:  # noqa: BLE001 -- every error becomes one line unless --debug
        if debug:
            raise
        from .runfiles import CheckpointError
        from .parallel import ParallelError
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, (CheckpointError, ParallelError)):
            code = 1
        elif isinstance(e, (ValueError, KeyError, OSError)):
            code = 2
        else:
            code = 1
            message = (f"{type(e).__name__}: {message} (an internal error; rerun with --debug "
                       f"for the traceback)")
        from .parallel import launched_rank, launched_size
        if launched_size() > 1:          # under mpirun every rank reports: say which
            message = f"rank {launched_rank()}: {message}"
        sys.stderr.write(f"tinynorm: error: {message}\n")
        return code
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())

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


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
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


def _residual_scale(text):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _norm_help():
    from .norms import norm_names
    return " | ".join(norm_names()) + " (tinynorm.norms registry)"


# flag name -> (config key, type, help)
TRAIN_FLAGS = {
    "--model": ("model", str, "cifar10_nv | resnet50 | deep_linear"),
    "--norm": ("norm", str, None),   # help from the registry, when the parser is built
    "--init": ("init", str, "weight init: caffe_xavier (Caffe's filler, default) | glorot | he "
                            "| orthogonal"),
    "--wn-g-init": ("wn_g_init", str, "WN gains start at 1 (one, default) or at ||v|| (norm), "
                                      "or are fixed at 1 (frozen)"),
    "--normprop-scale": ("normprop_scale", float,
                         "NormProp divides by this times ||W|| (1.21; 1.0: the seed paper)"),
    "--residual-scale": ("residual_scale", _residual_scale,
                         "ResNet residual sum scale: auto (the norm's own) or a number"),
    "--dataset": ("dataset", str, "fashion-mnist | cifar10 | imagenet"),
    "--data-root": ("data_root", str, "directory holding the data set files"),
    "--width": ("width", float, "channel multiplier"),
    "--stem": ("stem", str, "resnet50 stem: cifar | imagenet"),
    "--bn-chunk": ("bn_chunk", int, "BN statistics per chunk of this many samples"),
    "--depth": ("depth", int, "deep_linear depth"),
    "--linear-width": ("linear_width", int, "deep_linear hidden units"),
    "--epochs": ("epochs", int, "number of epochs"),
    "--max-iters": ("max_iters", int, "stop after this many iterations"),
    "--batch-size": ("batch_size", int, "mini-batch size"),
    "--lr": ("lr", float, "initial learning rate"),
    "--schedule": ("schedule", str, "constant | linear | poly"),
    "--lr-final": ("lr_final", float, "final learning rate of linear/poly decay"),
    "--power": ("power", float, "power of the poly schedule"),
    "--warmup": ("warmup", int, "warm-up iterations"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "weight decay (w and v only)"),
    "--seed": ("seed", int, "seed of init, data order and augmentation"),
    "--train-limit": ("train_limit", int, "use N training images"),
    "--test-limit": ("test_limit", int, "use N test images"),
    "--min-std": ("min_std", float, "floor of the per-pixel std in the input normalizer"),
    "--diverge-loss": ("diverge_loss", float, "loss above which the run counts as diverged"),
    "--track-norms-every": ("track_norms_every", int, "record output norms every k iterations"),
    "--track-signal-every": ("track_signal_every", int,
                             "record unit output RMS/mean and weight coherence every k iterations"),
    "--eval-every": ("eval_every", int, "evaluate every k epochs"),
    "--clean-eval-size": ("clean_eval_size", int,
                          "evaluate also on this many fixed training images, eval mode, no "
                          "augmentation (train_top1_clean; 0: off; default 10000)"),
    "--dropout": ("dropout", float, "resnet50: dropout p before the classifier (default 0)"),
    "--dtype": ("dtype", str, "float32 (default) | float64"),
    "--rank-timeout": ("rank_timeout", float,
                       "under mpirun: abort all ranks when one is silent this many seconds"),
    "--out": ("out", str, "run directory (log.h5, checkpoint.h5)"),
    "--device": ("device", str, "cpu | gpu: where the model, optimizer state and batches "
                                "live (default cpu)"),
}


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
    overrides = {key: getattr(args, key) for key, _, _ in TRAIN_FLAGS.values()
                 if getattr(args, key) is not None}
    for flag, key in (("no_augment", "augment"), ("no_progress", "progress")):
        if getattr(args, flag):
            overrides[key] = False
    if args.ddi:
        overrides["ddi"] = True
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
    from .train import Trainer, evaluate
    run = Path(args.run)
    ckpt = run / "checkpoint.h5" if run.is_dir() else run
    ck = Trainer._read_checkpoint(ckpt)        # verified; the configuration comes from it
    cfg = dict(ck["config"], out=str(ckpt.parent), progress=False)
    if args.device is not None:                # e.g. a GPU run evaluated on the CPU
        cfg["device"] = args.device
    trainer = Trainer(cfg)
    trainer._ckpt = ck
    trainer.load_checkpoint(ckpt)
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
    device = check_device(args.device)         # before the model is built
    c, h, w = (int(v) for v in args.input.split("x"))
    model = build_model(args.model, args.norm, in_channels=c, num_classes=args.classes,
                        width=args.width, stem=args.stem, bn_chunk=args.bn_chunk,
                        in_features=c * h * w,
                        opts=dict(init=args.init, wn_g_init=args.wn_g_init,
                                  normprop_scale=args.normprop_scale,
                                  residual_scale=args.residual_scale)).to(device)
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
    overrides = {key: getattr(args, key) for key, _, _ in TRAIN_FLAGS.values()
                 if getattr(args, key, None) is not None}
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
    from . import __version__, backend, config
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
    settings = config.current()
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


def _add_train_flags(p):
    for flag, (key, typ, help_) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_ or _norm_help())


def build_parser() -> argparse.ArgumentParser:
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
    _add_train_flags(p)
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ddi", action="store_true", help="WN data-dependent init")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.h5 with its configuration (only "
                            "epochs, max-iters, eval-every, track-norms-every, out, "
                            "data-root and progress may change)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT (without it a directory holding a run "
                            "is refused)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set")
    p.add_argument("run", help="run directory or checkpoint.h5")
    p.add_argument("--device", default=None, help="cpu | gpu (default: the run's)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("profile", help="time per layer type of a training step (Figure 1)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--norm", default="bn")
    p.add_argument("--width", type=_positive_float, default=1.0)
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    p.add_argument("--bn-chunk", type=_positive_int, default=None)
    p.add_argument("--classes", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--input", default="3x32x32", type=_chw, help="CxHxW")
    p.add_argument("--steps", type=_positive_int, default=3)
    p.add_argument("--init", default="caffe_xavier")
    p.add_argument("--wn-g-init", dest="wn_g_init", default="one")
    p.add_argument("--normprop-scale", dest="normprop_scale", type=_positive_float,
                   default=1.21)
    p.add_argument("--residual-scale", dest="residual_scale", type=_residual_scale,
                   default="auto")
    p.add_argument("--device", default="cpu", help="cpu | gpu (default cpu)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("signal", help="RMS and mean of every conv unit's and residual "
                                      "block's output on a real batch; weight coherence")
    p.add_argument("run", nargs="?", help="a run directory (or its checkpoint.h5); "
                                          "default: a fresh model from the flags")
    _add_train_flags(p)
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
        from .checkpoint import CheckpointError
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

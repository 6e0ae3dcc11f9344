"""The `tinynorm` command line.

    tinynorm gradcheck                 every built-in op against finite differences
    tinynorm train [--config F] ...    train one configuration (flags override the file)
    tinynorm eval RUN_DIR              evaluate a run's checkpoint on the test set
    tinynorm profile --model M ...     time per layer type of a training step (Figure 1)
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def _cmd_gradcheck(args) -> int:
    from . import selfcheck
    return selfcheck.main(rtol=args.rtol)


# flag name -> (config key, type, help)
TRAIN_FLAGS = {
    "--model": ("model", str, "cifar10_nv | resnet50 | deep_linear"),
    "--norm": ("norm", str, "none | bn | wn | normprop | trelu"),
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
    "--eval-every": ("eval_every", int, "evaluate every k epochs"),
    "--out": ("out", str, "run directory (log.h5, checkpoint.h5)"),
}


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"tinynorm: config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"tinynorm: {path} is not valid TOML: {e}") from None
    return data.get("train", data)


def _cmd_train(args) -> int:
    from .train import Trainer, make_config
    base = load_config_file(args.config) if args.config else {}
    overrides = {key: getattr(args, key) for key, _, _ in TRAIN_FLAGS.values()
                 if getattr(args, key) is not None}
    for flag, key in (("no_augment", "augment"), ("no_progress", "progress")):
        if getattr(args, flag):
            overrides[key] = False
    if args.ddi:
        overrides["ddi"] = True
    if args.resume:
        # continue with the run's own configuration; the file and flags override it
        from .train import read_log
        out = Path(overrides.get("out") or base.get("out") or "runs/default")
        if not (out / "checkpoint.h5").exists():
            raise SystemExit(f"tinynorm: nothing to resume: {out / 'checkpoint.h5'} does not exist")
        base = dict(read_log(out / "log.h5")["config"] if (out / "log.h5").exists() else {},
                    **base)
    try:
        cfg = make_config(overrides, base)
    except KeyError as e:
        raise SystemExit(f"tinynorm: {e.args[0]}") from None
    trainer = Trainer(cfg)
    status = trainer.run(resume=args.resume)
    extra = f" at iteration {trainer.diverged_at} ({trainer.diverged_reason})" \
        if status == "diverged" else ""
    print(f"run {status}{extra}; log: {Path(cfg['out']) / 'log.h5'}")
    return 130 if status == "interrupted" else 0


def _cmd_eval(args) -> int:
    from .train import Trainer, evaluate, read_log
    run = Path(args.run)
    ckpt = run / "checkpoint.h5" if run.is_dir() else run
    log = read_log(ckpt.parent / "log.h5")
    cfg = dict(log["config"], out=str(ckpt.parent), progress=False)
    trainer = Trainer(cfg)
    trainer.load_checkpoint(ckpt)
    loss, top1, top5 = evaluate(trainer.model, trainer.data.test_batches(cfg["eval_batch_size"]))
    print(f"{ckpt}: test loss {loss:.4f}  top-1 {top1:.2f}%  top-5 {top5:.2f}% "
          f"({len(trainer.data.test)} images)")
    return 0


def _cmd_profile(args) -> int:
    import json

    import numpy as np

    from .models import build_model
    from .profile import format_profile, profile_step
    c, h, w = (int(v) for v in args.input.split("x"))
    model = build_model(args.model, args.norm, in_channels=c, num_classes=args.classes,
                        width=args.width, stem=args.stem, bn_chunk=args.bn_chunk,
                        in_features=c * h * w)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, c, h, w)).astype(np.float32)
    y = rng.integers(0, args.classes, args.batch_size)
    result = profile_step(model, x, y, steps=args.steps)
    print(f"{args.model} norm={args.norm} width={args.width} batch={args.batch_size} "
          f"input={args.input}")
    print(format_profile(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(vars(args), func=None, **result), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinynorm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every built-in op's gradients (float64)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("train", help="train one configuration")
    p.add_argument("--config", help="TOML file with the run's keys (flags override it)")
    for flag, (key, typ, help_) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_)
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ddi", action="store_true", help="WN data-dependent init")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.h5")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set")
    p.add_argument("run", help="run directory or checkpoint.h5")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("profile", help="time per layer type of a training step (Figure 1)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--norm", default="bn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--bn-chunk", type=int, default=None)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input", default="3x32x32", help="CxHxW")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_profile)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "profile"):
        from .backend import tune_allocator
        tune_allocator()   # keep freed activations in the heap: no page faults per step
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

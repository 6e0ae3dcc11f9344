"""Figure 1: share of a training step's time per layer type, measured here.

Runs `tinynorm profile` (tinynorm.profile.profile_step) on ResNet-50 and
cifar10-nv with BN and draws the shares next to the paper's figure (BN about
1/4 of ResNet-50's time on a Titan X Pascal GPU).

Presets (batch 128 for both):
  paper: ResNet-50 ImageNet stem 3x224x224 (very slow on a CPU), cifar10-nv 3x28x28.
  cpu:   ResNet-50 CIFAR stem 3x32x32 at full width, cifar10-nv 3x28x28 at full width.
  smoke: both at width 1/8 and batch 32.

    python experiments/fig1_time_share.py --preset cpu
"""
import json


from common import ROOT, figure_path, log_dir, parse_args
import numpy as np  # after common, which imports tinynorm first (OPENBLAS_THREAD_TIMEOUT)

from tinynorm.backend import to_device
from tinynorm.models import cifar10_nv, resnet50
from tinynorm.profile import format_profile, profile_step

PRESETS = {
    "paper": dict(resnet=dict(stem="imagenet", width=1.0, num_classes=1000, input=(3, 224, 224)),
                  nv=dict(width=1.0, input=(3, 28, 28)), batch=128, steps=2),
    "cpu": dict(resnet=dict(stem="cifar", width=1.0, num_classes=10, input=(3, 32, 32)),
                nv=dict(width=1.0, input=(3, 28, 28)), batch=128, steps=3),
    "smoke": dict(resnet=dict(stem="cifar", width=1 / 8, num_classes=10, input=(3, 32, 32)),
                  nv=dict(width=1 / 8, input=(3, 28, 28)), batch=32, steps=1),
}


def main():
    args = parse_args(__doc__)
    p = PRESETS[args.preset]
    out_dir = log_dir(args.preset, "fig1_time_share", args.runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.plot_only:
        rng = np.random.default_rng(0)
        r = p["resnet"]
        models = {
            "ResNet-50 (BN)": (resnet50("bn", r["num_classes"], r["stem"], r["width"]),
                               r["input"], r["num_classes"]),
            "cifar10-nv (BN)": (cifar10_nv("bn", 3, 10, p["nv"]["width"]), p["nv"]["input"], 10),
        }
        for name, (model, shape, classes) in models.items():
            model.to(args.device)
            x = to_device(rng.standard_normal((p["batch"],) + shape).astype(np.float32),
                          args.device)
            y = to_device(rng.integers(0, classes, p["batch"]), args.device)
            res = profile_step(model, x, y, steps=p["steps"])
            res["device"] = args.device
            print(f"{name}, batch {p['batch']}, input {'x'.join(map(str, shape))}, "
                  f"{args.device}")
            print(format_profile(res) + "\n")
            results[name] = res
        (out_dir / "profile.json").write_text(json.dumps(results, indent=1))
    else:
        results = json.loads((out_dir / "profile.json").read_text())
    from plots.figures import plot_time_share
    out = figure_path(args.preset, "fig1_time_share", args.runs, "fig1_time_share")
    plot_time_share(results, out)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()

"""Figure 2: cifar10-nv with no normalization, BN, WN, NormProp and TReLU WN.

Per-variant settings are the paper's footnote 3: SGD momentum 0.9, batch 128,
initial lr 0.01 for all; Caffe's xavier init (the defaults: WN's g started at
1, NormProp's norm scale 1.21; the committed logs of 2026-11 ran Glorot's init
and g = ||v||, see RESULTS.md);
  none      linear decay to 1e-5, no weight decay
  bn        linear decay to 1e-5, wd 2e-3
  wn        linear decay to 1e-4, no weight decay
  normprop  poly (power 2) decay to 1e-5, wd 1e-3
  trelu     poly (power 2) decay to 1e-5, wd 1e-3

The paper's claim (R1, its Figure 2 and section 4.1): on this moderately
small network "WN algorithms outperform BN": they "have both better training
curves (they converge faster) as well as higher final test accuracy (with the
exception of the original weight normalization)"; and "even if training is
done with no normalization the final accuracy is comparable to that of a
normalized network".

Presets (what each changes from the paper is listed in PRESETS below):
  paper: CIFAR-10, 256 epochs, full width, random 28x28 crops of 32x32 + flips.
  cpu:   the regime of the claim on this 2-core machine: Fashion-MNIST
         (zero-padded 28->32, random 28x28 crops, no flips: its items have one
         orientation), width 0.25 (32..80 channels), the paper's batch 128, lr
         0.01 and per-norm schedules and weight decays, a 5k-image training
         subset for 40 epochs (1560 iterations; the schedules keep their shape
         over the shorter run), small enough for BN's clean training accuracy
         to approach saturation within the budget; 2 seeds per norm (--seeds);
         the full 10k test set and the clean training evaluation every 4 epochs.
         The per-pixel std is floored at 10 grey levels (min_std): Fashion-
         MNIST's border pixels are nearly constant (std down to 0.09), and
         without a floor a rare non-zero border pixel becomes an input of ~150.
  smoke: width 1/16 (8..20 channels), 6400 images, 2 epochs, batch 32: 400
         iterations per variant at the paper's lr 0.01, about two minutes
         for the five.  Fewer iterations leave three of the five at chance
         (2048 images at batch 64, width 1/8: no norm, WN and TReLU at
         10-11%); a narrower net at a smaller batch buys the iterations.

    python experiments/fig2_cifar10_nv.py --preset cpu [--only bn_s0,wn_s0] [--seeds 0,1]
"""
from common import figure_path, parse_args, run_variants, seeded

PER_NORM = {
    "none": dict(schedule="linear", lr_final=1e-5, weight_decay=0.0),
    "bn": dict(schedule="linear", lr_final=1e-5, weight_decay=2e-3),
    "wn": dict(schedule="linear", lr_final=1e-4, weight_decay=0.0),
    "normprop": dict(schedule="poly", power=2.0, lr_final=1e-5, weight_decay=1e-3),
    "trelu": dict(schedule="poly", power=2.0, lr_final=1e-5, weight_decay=1e-3),
}

COMMON = dict(model="cifar10_nv", lr=0.01, momentum=0.9, batch_size=128,
              track_signal_every=25)

PRESETS = {
    "paper": dict(dataset="cifar10", width=1.0, epochs=256, crop=28, pad=0),
    "cpu": dict(dataset="fashion-mnist", min_std=10.0, width=0.25, epochs=40,
                train_limit=5000, crop=28, pad=2, flip=False, eval_every=4,
                track_signal_every=195),
    "smoke": dict(dataset="fashion-mnist", min_std=10.0, width=1 / 16, epochs=2, train_limit=6400,
                  test_limit=1000, batch_size=32, crop=28, pad=2),
}


SEEDS = {"paper": (0,), "cpu": (0, 1), "smoke": (0,)}


def variants(preset, seeds=None):
    return seeded({norm: dict(COMMON, norm=norm, **PRESETS[preset], **extra)
                   for norm, extra in PER_NORM.items()}, seeds or SEEDS[preset])


def main():
    args = parse_args(__doc__)
    logs = run_variants("fig2_cifar10_nv", variants(args.preset, args.seeds), args)
    if logs:
        from plots.figures import plot_seeded_curves, seed_table
        out = figure_path(args.preset, "fig2_cifar10_nv", args.runs, "fig2_cifar10_nv")
        plot_seeded_curves(logs, out, title=f"cifar10-nv ({args.preset} preset)")
        print(seed_table(logs, pairs=[("bn", "wn")]))
        print(f"figure: {out}")


if __name__ == "__main__":
    main()

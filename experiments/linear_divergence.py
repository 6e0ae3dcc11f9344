"""Section 5: a 50-layer linear network (no bias, 64 units per hidden layer).

For every learning rate of a log-spaced grid and each of WN (the paper's
network), BN and no normalization (controls), train with plain SGD + momentum
0.9 at a constant lr for at most `max_iters` iterations and record the
iteration at which the run diverged (non-finite loss or weights, or loss above
`diverge_loss`), or that it did not.  The paper: with WN, "with a wide range of
learning rates the network completely diverged in less than a hundred
iterations" (ImageNet).

Presets:
  paper: ImageNet inputs flattened (3x224x224 centre crops), batch 256.
  cpu:   Fashion-MNIST 28x28 flattened, per-pixel normalized, batch 128,
         10 lrs from 1e-4 to 1, 300 iterations at most.
  smoke: 3 lrs, 20 iterations, 1024 images.

Every layer's output RMS and weight coherence (the paper's footnote 2) is
recorded at every iteration (``signal`` and ``coherence`` groups of the logs);
``plots/linear_coherence.png`` draws the coherence of the WN runs up to their
divergence.  Inits are the defaults (Caffe's xavier filler, WN's g started at
1); runs before 2026-12 used Glorot's init and g = ||v||.

    python experiments/linear_divergence.py --preset cpu
"""

from common import figure_path, parse_args, run_variants
import numpy as np  # after common, which imports tinynorm first (OPENBLAS_THREAD_TIMEOUT)

NORMS = ("wn", "bn", "none")
# track_signal_every=1: every layer's output RMS and weight coherence at every
# iteration, to see what happens to orthogonality before a divergence
COMMON = dict(model="deep_linear", depth=50, linear_width=64, schedule="constant",
              momentum=0.9, weight_decay=0.0, augment=False, seed=0, eval_every=10**6,
              diverge_loss=100.0, track_norms_every=1, track_signal_every=1)

PRESETS = {
    "paper": dict(dataset="imagenet", batch_size=256, crop=224, pad=0, epochs=1000,
                  max_iters=1000, lrs=np.logspace(-4, 0, 9)),
    "cpu": dict(dataset="fashion-mnist", min_std=10.0, batch_size=128, crop=28, pad=0, epochs=1000,
                max_iters=300, lrs=np.logspace(-4, 0, 10)),
    "smoke": dict(dataset="fashion-mnist", min_std=10.0, batch_size=64, crop=28, pad=0, epochs=1000,
                  max_iters=20, train_limit=1024, test_limit=200, lrs=np.logspace(-3, 0, 3)),
}


def variants(preset):
    settings = dict(PRESETS[preset])
    lrs = settings.pop("lrs")
    return {f"{norm}_lr{lr:.0e}": dict(COMMON, norm=norm, lr=float(lr), **settings)
            for norm in NORMS for lr in lrs}


def main():
    args = parse_args(__doc__)
    logs = run_variants("linear_divergence", variants(args.preset), args)
    if logs:
        from plots.figures import plot_divergence
        out = figure_path(args.preset, "linear_divergence", args.runs, "linear_divergence")
        table = plot_divergence(logs, out, title=f"50-layer linear network ({args.preset} preset)")
        print(table)
        from plots.figures import plot_coherence
        out2 = figure_path(args.preset, "linear_divergence", args.runs, "linear_coherence")
        plot_coherence({k: v for k, v in logs.items() if k.startswith("wn_")}, out2,
                       title=f"50-layer linear WN network: weight coherence ({args.preset} preset)")
        print(f"figures: {out}, {out2}")


if __name__ == "__main__":
    main()

"""Figure 3 (and the runs behind Figure 4): ResNet-50 with BN, WN, NormProp, TReLU WN.

Paper (section 4.2, footnote 4): ImageNet, 120 epochs, batch 256 with BN
statistics per 64-sample chunk (4 GPUs), lr 0.1 with poly (power 2) decay to 0,
weight decay 1e-4, Xavier init, 256x256 images randomly cropped to 224 with
colour distortion and flips, inputs in [-1, 1].  The same settings are used for
every norm here (the paper reports its best WN configuration was BN's).
Output norms of the first layer (stem) and the last residual block are
recorded every `track_norms_every` iterations (Figure 4), and every unit's
output RMS and every layer's weight coherence (the paper's footnote 2) every
`track_signal_every`.  Init: Caffe's xavier filler (the paper's), WN's g
started at 1, NormProp's norm scale 1.21, the residual sum scaled by 1/sqrt(2)
for NormProp only (the defaults, which the committed logs ran; the 2026-11
logs, in git history, ran Glorot's init, g = ||v|| and the 1/sqrt(2) scale
for TReLU WN too -- RESULTS.md).

Presets:
  paper: as above.
  cpu:   full depth (50 layers), width 0.25 (16..512 channels), CIFAR stem on
         Fashion-MNIST 28x28 crops of the zero-padded 32x32 images + flips,
         batch 128 with BN statistics per 64-sample chunk, 30k training images,
         6 epochs (about 1400 iterations); Fashion-MNIST's per-pixel std floored
         at 10 grey levels as in fig2.
  smoke: width 1/16, 256 images, 1 epoch.

    python experiments/fig3_resnet50.py --preset cpu
"""
from common import figure_path, parse_args, run_variants

NORMS = ("bn", "wn", "normprop", "trelu")
# diverge_loss 1e4: NormProp's outputs grow through the 16 blocks at init (see
# RESULTS.md), so its first losses are in the hundreds; only a loss far beyond
# that, or a non-finite one, counts as divergence here
COMMON = dict(model="resnet50", lr=0.1, schedule="poly", power=2.0, lr_final=0.0,
              weight_decay=1e-4, momentum=0.9, bn_chunk=64, seed=0, diverge_loss=1e4)

PRESETS = {
    "paper": dict(dataset="imagenet", stem="imagenet", width=1.0, epochs=120, batch_size=256,
                  crop=224, pad=0, track_norms_every=100, eval_batch_size=100),
    "cpu": dict(dataset="fashion-mnist", min_std=10.0, stem="cifar", width=0.25, epochs=6,
                batch_size=128, train_limit=30000, crop=28, pad=2, track_norms_every=5,
                track_signal_every=25),
    "smoke": dict(dataset="fashion-mnist", min_std=10.0, stem="cifar", width=1 / 16, epochs=1,
                  batch_size=64, bn_chunk=32, train_limit=256, test_limit=200, crop=28, pad=2,
                  track_norms_every=1),
}


def variants(preset):
    return {norm: dict(COMMON, norm=norm, **PRESETS[preset]) for norm in NORMS}


def main():
    args = parse_args(__doc__)
    logs = run_variants("fig3_resnet50", variants(args.preset), args)
    if logs:
        from plots.figures import plot_output_norms, plot_training_curves
        out = figure_path(args.preset, "fig3_resnet50", args.runs, "fig3_resnet50")
        plot_training_curves(logs, out, title=f"ResNet-50 ({args.preset} preset)")
        out4 = figure_path(args.preset, "fig3_resnet50", args.runs, "fig4_output_norms")
        plot_output_norms(logs, out4, title=f"ResNet-50 output norms ({args.preset} preset)")
        print(f"figures: {out}, {out4}")


if __name__ == "__main__":
    main()

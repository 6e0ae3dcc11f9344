"""Ablation: the details of the normalizations as their authors ran them.

Beyond the paper.  Each detail below departs from how the paper's authors (in
NVIDIA Caffe) or NormProp's authors ran their algorithms in tinynorm's first
version; this script measures what each one does to the start of training:

  NormProp     normprop_scale 1.0 (the seed paper's printed formula) vs 1.21
               (Arpit et al.'s released code)
  WN           glorot init + g = ||v|| (tinynorm's old default), caffe_xavier
               + g = ||v||, caffe_xavier + g = 1 (today's default), data-
               dependent init (Salimans & Kingma)
  no norm      glorot vs caffe_xavier
  TReLU WN     (ResNet-50 only) residual scale 1 (the standard block, today's
               default) vs 1/sqrt(2) (tinynorm's old block)

for cifar10-nv and ResNet-50 at the cpu presets' width (0.25).  Every run
records, every 25 iterations, the RMS and mean of every conv unit's and
residual block's output and the coherence of every layer's weights
(``track_signal_every``), plus the per-iteration loss; the table gives the
initial loss, the RMS at init of the first, middle and last outputs along the
main path, the loss at iterations 100 and 300 (mean of the 10 iterations
ending there) and the iteration of divergence.

Settings: the cpu presets of fig2_cifar10_nv.py (per-norm lr schedule and
weight decay of the paper's footnote 3, lr 0.01) and fig3_resnet50.py (lr 0.1
poly-2, wd 1e-4), with the schedules spanning the presets' full runs (1560 and
1404 iterations at batch 128) but stopped after 300 iterations, and batch 64
instead of 128 (no variant here has batch statistics, so the batch size only
sets the gradient noise; 64 keeps the cpu preset within about 45 minutes).

Presets:
  cpu:   as above, Fashion-MNIST, 300 iterations per run, 2000 test images.
  smoke: width 1/16, 6 iterations, 256 images (the tests run it).
  paper: CIFAR-10 / ImageNet at full width, 300 iterations (meant for a GPU).

    python experiments/ablation_init.py --preset cpu
"""
import math

from common import figure_path, parse_args, run_variants

from fig2_cifar10_nv import PER_NORM as NV_PER_NORM
from fig3_resnet50 import COMMON as RESNET_COMMON

# (variant suffix, norm, overrides) for both networks
SETTINGS = [
    ("normprop_s1.00", "normprop", dict(normprop_scale=1.0)),
    ("normprop_s1.21", "normprop", dict(normprop_scale=1.21)),
    ("wn_glorot_gnorm", "wn", dict(init="glorot", wn_g_init="norm")),
    ("wn_caffe_gnorm", "wn", dict(init="caffe_xavier", wn_g_init="norm")),
    ("wn_caffe_g1", "wn", dict(init="caffe_xavier", wn_g_init="one")),
    ("wn_ddi", "wn", dict(init="caffe_xavier", ddi=True)),
    ("none_glorot", "none", dict(init="glorot")),
    ("none_caffe", "none", dict(init="caffe_xavier")),
]
RESNET_ONLY = [
    ("trelu_res1", "trelu", dict(residual_scale=1.0)),
    ("trelu_res0.71", "trelu", dict(residual_scale=1.0 / math.sqrt(2.0))),
]

TRACK = dict(track_signal_every=25, track_norms_every=25, seed=0)

PRESETS = {
    "cpu": dict(
        nv=dict(model="cifar10_nv", dataset="fashion-mnist", min_std=10.0, width=0.25,
                epochs=10, train_limit=20000, crop=28, pad=2, lr=0.01, momentum=0.9,
                batch_size=64, test_limit=2000, max_iters=300),
        resnet=dict(RESNET_COMMON, dataset="fashion-mnist", min_std=10.0, stem="cifar",
                    width=0.25, epochs=6, train_limit=30000, crop=28, pad=2,
                    batch_size=64, bn_chunk=None, test_limit=2000, max_iters=300)),
    "smoke": dict(
        nv=dict(model="cifar10_nv", dataset="fashion-mnist", min_std=10.0, width=1 / 16,
                epochs=1, train_limit=256, test_limit=100, crop=28, pad=2, lr=0.01,
                momentum=0.9, batch_size=32, max_iters=6),
        resnet=dict(RESNET_COMMON, dataset="fashion-mnist", min_std=10.0, stem="cifar",
                    width=1 / 16, epochs=1, train_limit=256, test_limit=100, crop=28, pad=2,
                    batch_size=32, bn_chunk=None, max_iters=6)),
    "paper": dict(
        nv=dict(model="cifar10_nv", dataset="cifar10", width=1.0, epochs=256, crop=28, pad=0,
                lr=0.01, momentum=0.9, batch_size=128, max_iters=300),
        resnet=dict(RESNET_COMMON, dataset="imagenet", stem="imagenet", width=1.0, epochs=120,
                    batch_size=256, crop=224, pad=0, eval_batch_size=100, max_iters=300)),
}


def variants(preset):
    p = PRESETS[preset]
    out = {}
    for suffix, norm, extra in SETTINGS:
        # cifar10-nv: the footnote-3 schedule and weight decay of the norm
        out[f"nv_{suffix}"] = dict(p["nv"], **NV_PER_NORM[norm], norm=norm, **TRACK, **extra)
    for suffix, norm, extra in SETTINGS + RESNET_ONLY:
        out[f"resnet_{suffix}"] = dict(p["resnet"], norm=norm, **TRACK, **extra)
    return out


def main():
    args = parse_args(__doc__)
    logs = run_variants("ablation_init", variants(args.preset), args)
    if logs:
        from plots.figures import ablation_table, plot_ablation, plot_signal_by_depth
        out = figure_path(args.preset, "ablation_init", args.runs, "ablation_init")
        plot_ablation(logs, out, title=f"init / scale ablation ({args.preset} preset)")
        out2 = figure_path(args.preset, "ablation_init", args.runs, "signal_by_depth")
        plot_signal_by_depth(logs, out2, title=f"RMS by depth ({args.preset} preset)")
        print(ablation_table(logs))
        print(f"figures: {out}, {out2}")


if __name__ == "__main__":
    main()

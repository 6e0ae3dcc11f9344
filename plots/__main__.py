"""Redraw every committed figure from the committed cpu-preset logs:

    python -m plots

``plots/logs/<experiment>/`` holds the runs in the regime of the paper's
claims (named ``<variant>_s<seed>``); ``plots/logs/short/<experiment>/`` the
short one-seed runs of 2026-11/12, whose figures go to ``plots/short/``.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from plots.figures import (DATA_RICH_PAIRS, ablation_table, plot_ablation,  # noqa: E402
                           plot_coherence, plot_divergence, plot_divergence_factorial,
                           plot_gain_and_coherence, plot_output_norms, plot_seeded_curves,
                           plot_signal_by_depth, plot_time_share, plot_training_curves,
                           seed_table, split_variants)
from tinynorm.train import read_log  # noqa: E402


def logs_of(experiment):
    d = HERE / "logs" / experiment
    return {p.stem: p for p in sorted(d.glob("*.h5"))} if d.exists() else {}


def short_runs(drawn):
    """The 2026-11/12 one-seed runs (short of the claims' regime), as they were drawn."""
    if logs := logs_of("short/fig2_cifar10_nv"):
        plot_training_curves(logs, HERE / "short" / "fig2_cifar10_nv.png",
                             "cifar10-nv (short runs, 2026-11/12)")
        drawn.append("short/fig2_cifar10_nv.png")
        if all(len(read_log(p)["signal"].get("iteration", [])) for p in logs.values()):
            plot_signal_by_depth(logs, HERE / "short" / "fig2_signal_by_depth.png",
                                 "cifar10-nv: RMS by depth, initialization and end (short runs)")
            drawn.append("short/fig2_signal_by_depth.png")
    if logs := logs_of("short/fig3_resnet50"):
        plot_training_curves(logs, HERE / "short" / "fig3_resnet50.png",
                             "ResNet-50 (short runs, 2026-11/12)")
        plot_output_norms(logs, HERE / "short" / "fig4_output_norms.png",
                          "ResNet-50 output norms (short runs, 2026-11/12)")
        drawn += ["short/fig3_resnet50.png", "short/fig4_output_norms.png"]
        if all(len(read_log(p)["signal"].get("iteration", [])) for p in logs.values()):
            plot_signal_by_depth(logs, HERE / "short" / "fig3_signal_by_depth.png",
                                 "ResNet-50: RMS by depth, initialization and end (short runs)")
            drawn.append("short/fig3_signal_by_depth.png")
    if logs := logs_of("short/linear_divergence"):
        print(plot_divergence(logs, HERE / "short" / "linear_divergence.png",
                              "50-layer linear network (short study, one seed)"))
        plot_coherence({k: v for k, v in logs.items() if k.startswith("wn_")},
                       HERE / "short" / "linear_coherence.png",
                       "50-layer linear WN network: weight coherence (short study)")
        drawn += ["short/linear_divergence.png", "short/linear_coherence.png"]


def main():
    drawn = []
    short_runs(drawn)
    if logs := logs_of("fig2_cifar10_nv"):
        plot_seeded_curves(logs, HERE / "fig2_cifar10_nv.png", "cifar10-nv (cpu preset, seeds)")
        print(seed_table(logs, pairs=[("bn", "wn")]))
        drawn.append("fig2_cifar10_nv.png")
    if logs := logs_of("fig3_resnet50"):
        # the data-rich pair (16k images x 10 epochs) in a figure of its own
        curves, rich = split_variants({k: v for k, v in logs.items()
                                       if not k.startswith("normprop_lr")}, "_16k")
        plot_seeded_curves(curves, HERE / "fig3_resnet50.png", "ResNet-50 (cpu preset, seeds)")
        plot_output_norms({k: v for k, v in curves.items() if k.endswith("_s0")},
                          HERE / "fig4_output_norms.png",
                          "ResNet-50 output RMS (cpu preset, seed 0)", rms=True)
        print(seed_table(curves, pairs=[("bn", "wn")]))
        drawn += ["fig3_resnet50.png", "fig4_output_norms.png"]
        if rich:
            plot_seeded_curves(rich, HERE / "fig3_resnet50_16k.png",
                               "ResNet-50, 16k images x 10 epochs (cpu preset, seeds)")
            print(seed_table(rich, pairs=DATA_RICH_PAIRS))
            drawn.append("fig3_resnet50_16k.png")
    if logs := logs_of("linear_divergence"):
        print(plot_divergence_factorial(logs, HERE / "linear_divergence.png",
                                        "50-layer linear network (cpu preset, seeds)"))
        plot_gain_and_coherence({k: v for k, v in logs.items() if k.endswith("_s0")},
                                HERE / "linear_coherence.png",
                                "50-layer linear network: end-to-end gain and coherence "
                                "(cpu preset, seed 0)")
        drawn += ["linear_divergence.png", "linear_coherence.png"]
    if logs := logs_of("ablation_init"):
        plot_ablation(logs, HERE / "ablation_init.png", "init / scale ablation (cpu preset)")
        plot_signal_by_depth(logs, HERE / "signal_by_depth.png", "RMS by depth (cpu preset)")
        plot_output_norms({k: v for k, v in logs.items()
                           if k.startswith("resnet_") and ("wn_" in k or "trelu" in k)},
                          HERE / "ablation_fig4.png",
                          "ResNet-50, WN family: output norms and coherence, first 300 "
                          "iterations (cpu preset, ablation runs)")
        print(ablation_table(logs))
        drawn += ["ablation_init.png", "signal_by_depth.png", "ablation_fig4.png"]
    prof = HERE / "logs" / "fig1_time_share" / "profile.json"
    if prof.exists():
        plot_time_share(json.loads(prof.read_text()), HERE / "fig1_time_share.png")
        drawn.append("fig1_time_share.png")
    print("drew:", ", ".join(drawn) if drawn else "nothing (no logs under plots/logs)")


if __name__ == "__main__":
    main()

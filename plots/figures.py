"""The figures, drawn from run logs only (see tinynorm.train.read_log)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from tinynorm.train import read_log  # noqa: E402

LABELS = {"none": "no norm", "bn": "BN", "wn": "WN", "normprop": "NormProp", "trelu": "TReLU WN"}
COLORS = {"none": "tab:gray", "bn": "tab:blue", "wn": "tab:orange", "normprop": "tab:green",
          "trelu": "tab:red"}


def _smooth(y, n):
    y = np.asarray(y, float)
    if len(y) < n or n <= 1:
        return y
    kernel = np.ones(n) / n
    return np.convolve(y, kernel, mode="valid")


def _save(fig, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(logs: dict, out, title=""):
    """Training loss/accuracy per iteration and test top-1 per epoch, one line per norm."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, path in logs.items():
        log = read_log(path)
        it, ep = log["iter"], log["epoch"]
        label = LABELS.get(name, name)
        if log["status"] == "diverged":
            label += f" (diverged @ it {log['diverged_at']})"
        color = COLORS.get(name)
        n = max(1, len(it.get("loss", [])) // 100)
        if len(it.get("loss", [])):
            x = np.asarray(it["iteration"])[n - 1:] if n > 1 else it["iteration"]
            axes[0].plot(x, _smooth(it["loss"], n), label=label, color=color)
            axes[1].plot(x, _smooth(it["train_acc"], n), label=label, color=color)
        if len(ep.get("epoch", [])):
            ok = np.isfinite(ep["test_top1"])
            axes[2].plot(ep["epoch"][ok] + 1, ep["test_top1"][ok], "o-", label=label, color=color)
    axes[0].set(xlabel="iteration", ylabel="training loss (moving average)", yscale="log",
                title="training loss")
    axes[1].set(xlabel="iteration", ylabel="training top-1 accuracy, % (moving average)",
                title="training accuracy")
    axes[2].set(xlabel="epoch", ylabel="test top-1 accuracy, %", title="test accuracy")
    axes[2].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, out)


def plot_output_norms(logs: dict, out, title=""):
    """Figure 4: ||output|| of the first and last layers over training."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, path in logs.items():
        norms = read_log(path)["norms"]
        if not len(norms.get("iteration", [])):
            continue
        log = read_log(path)
        label = LABELS.get(name, name)
        if log["status"] == "diverged":
            label += f" (diverged @ it {log['diverged_at']})"
        # a run that diverged at once has a single record: draw it as a point
        marker = "o" if len(norms["iteration"]) < 3 else None
        for ax, role in zip(axes, ("first", "last")):
            ax.plot(norms["iteration"], norms[role], label=label, color=COLORS.get(name),
                    marker=marker)
    for ax, role in zip(axes, ("first layer (stem)", "last residual block")):
        ax.set(xlabel="iteration", ylabel="||output||_2 over the batch", yscale="log",
               title=f"output norm, {role}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, out)


def divergence_table(logs: dict):
    """Rows (norm, lr, diverged_at or None, iterations run, final loss)."""
    rows = []
    for name, path in logs.items():
        m = re.match(r"(\w+?)_lr(.+)$", name)
        log = read_log(path)
        its = log["iter"].get("iteration", np.array([]))
        rows.append((m.group(1), float(m.group(2)),
                     log["diverged_at"] if log["status"] == "diverged" else None,
                     int(len(its)), float(log["iter"]["loss"][-1]) if len(its) else np.nan))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def plot_divergence(logs: dict, out, title=""):
    """Iterations to divergence against lr; runs that did not diverge are drawn
    at their budget with an open marker.  Returns a text table."""
    rows = divergence_table(logs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [f"{'norm':<6}{'lr':>10}{'diverged at':>14}{'iters run':>11}{'last loss':>12}"]
    for norm in ("wn", "bn", "none"):
        sel = [r for r in rows if r[0] == norm]
        if not sel:
            continue
        lrs = np.array([r[1] for r in sel])
        div = np.array([r[2] if r[2] is not None else np.nan for r in sel], float)
        budget = np.array([r[3] for r in sel], float)
        color = COLORS.get(norm)
        # distinct markers and sizes: WN and no-norm often coincide exactly
        marker, size = {"wn": ("o", 10), "bn": ("^", 7), "none": ("s", 5)}[norm]
        ax.plot(lrs, np.where(np.isnan(div), budget, div), "-", color=color, alpha=0.4)
        ax.plot(lrs[~np.isnan(div)], div[~np.isnan(div)], marker, ms=size, color=color,
                label=f"{LABELS[norm]}: diverged")
        ax.plot(lrs[np.isnan(div)], budget[np.isnan(div)], marker, ms=size, mfc="none",
                color=color, label=f"{LABELS[norm]}: did not diverge (budget)")
        for r in sel:
            lines.append(f"{r[0]:<6}{r[1]:>10.1e}{str(r[2]) if r[2] is not None else '-':>14}"
                         f"{r[3]:>11}{r[4]:>12.4g}")
    ax.axhline(100, color="k", ls=":", lw=1, label="100 iterations (paper)")
    ax.set(xscale="log", yscale="log", xlabel="learning rate",
           ylabel="iterations until divergence", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out)
    return "\n".join(lines)


def plot_time_share(results: dict, out):
    """Figure 1: stacked shares per layer type, with the paper's BN share marked."""
    from tinynorm.profile import CATEGORIES
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * (len(names) + 1)))
    colors = {"convolution": "tab:blue", "batch norm": "tab:red", "relu": "tab:green",
              "pooling": "tab:purple", "other": "tab:gray"}
    rows = names + ["paper: ResNet-50, Titan X Pascal (BN only)"]
    for i, name in enumerate(names):
        res = results[name]
        left = 0.0
        for cat in CATEGORIES:
            share = 100 * res["by_category"][cat] / res["total"]
            ax.barh(i, share, left=left, color=colors[cat], label=cat if i == 0 else None)
            if share > 4:
                ax.text(left + share / 2, i, f"{share:.0f}%", ha="center", va="center",
                        color="white", fontsize=8)
            left += share
    ax.barh(len(names), 25, color=colors["batch norm"], hatch="//", alpha=0.6)
    ax.text(12.5, len(names), "BN ~1/4", ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set(xlim=(0, 100), xlabel="share of training-step time, %",
           title="Where a training step's time goes (this CPU vs the paper's GPU)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    _save(fig, out)

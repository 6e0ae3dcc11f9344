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

from tinynorm.norms import color_of, label_of  # noqa: E402


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
        label = label_of(name)
        if log["status"] == "diverged":
            label += f" (diverged @ it {log['diverged_at']})"
        color = color_of(name)
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


def probe_elements(cfg):
    """{"first": n, "last": n}: the number of elements of the probed layers'
    outputs for one sample, read off the model the configuration builds (one
    eval-mode forward of a zero image)."""
    from tinynorm.models import build_model
    from tinynorm.train import unit_options
    channels = 1 if cfg["dataset"] == "fashion-mnist" else 3
    classes = 1000 if cfg["dataset"] == "imagenet" else 10
    model = build_model(cfg["model"], cfg["norm"], in_channels=channels, num_classes=classes,
                        width=cfg["width"], seed=0, stem=cfg.get("stem", "cifar"),
                        opts=unit_options(cfg), depth=cfg.get("depth", 50),
                        linear_width=cfg.get("linear_width", 64),
                        in_features=channels * cfg["crop"] ** 2)
    layers = dict(model.named_layers())
    sizes = {}
    for role, name in model.probe_layers.items():
        layer = layers[name]
        forward = layer.forward
        layer.forward = lambda x, _f=forward, _r=role: _capture(sizes, _r, _f(x))
    model.eval()
    model(np.zeros((1, channels, cfg["crop"], cfg["crop"]), np.float32))
    return {role: int(np.prod(y.shape[1:])) for role, y in sizes.items()}


def _capture(store, role, y):
    store[role] = y
    return y


def plot_output_norms(logs: dict, out, title="", rms=False):
    """Figure 4: ||output|| of the first and last layers over training; beside
    it, where the logs have it, the median over layers of the weight coherence
    (the paper's footnote 2).  ``rms``: divide each norm by the square root of
    the number of elements it is taken over (batch x the layer's output size),
    so that layers of different sizes compare."""
    loaded = {name: read_log(path) for name, path in logs.items()}
    with_coherence = any(len(log.get("coherence", {}).get("iteration", []))
                         for log in loaded.values())
    fig, axes = plt.subplots(1, 3 if with_coherence else 2,
                             figsize=(16.5 if with_coherence else 11, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, (name, log) in enumerate(loaded.items()):
        norms = log["norms"]
        variant, seed = split_seed(name)
        label = _variant_label(variant) if seed is not None else label_of(name)
        if log["status"] == "diverged":
            label += f" (diverged @ it {log['diverged_at']})"
        color = _variant_color(variant, i) if seed is not None else color_of(name) or cmap(i % 10)
        scale = {"first": 1.0, "last": 1.0}
        if rms:
            n = probe_elements(log["config"])
            scale = {r: 1.0 / np.sqrt(log["config"]["batch_size"] * n[r]) for r in scale}
        if len(norms.get("iteration", [])):
            # a run that diverged at once has a single record: draw it as a point
            marker = "o" if len(norms["iteration"]) < 3 else None
            for ax, role in zip(axes, ("first", "last")):
                ax.plot(norms["iteration"], np.asarray(norms[role]) * scale[role], label=label,
                        color=color, marker=marker)
        coh = log.get("coherence", {})
        if with_coherence and len(coh.get("iteration", [])):
            vals = np.atleast_2d(np.asarray(coh["value"], float))
            axes[2].plot(coh["iteration"], np.nanmedian(vals, axis=1), label=label, color=color,
                         marker="o" if len(vals) < 3 else None)
    for ax, role in zip(axes, ("first layer (stem)", "last residual block")):
        ax.set(xlabel="iteration", yscale="log",
               ylabel="||output||_2 / sqrt(elements): RMS over the batch" if rms
               else "||output||_2 over the batch",
               title=f"output {'RMS' if rms else 'norm'}, {role}")
    if with_coherence:
        axes[2].set(xlabel="iteration", ylabel="median over layers of max_{i!=j} |cos(w_i, w_j)|",
                    title="weight coherence (footnote 2)", ylim=(0, None))
    for ax in axes:
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
        color = color_of(norm)
        # distinct markers and sizes: WN and no-norm often coincide exactly
        marker, size = {"wn": ("o", 10), "bn": ("^", 7), "none": ("s", 5)}[norm]
        ax.plot(lrs, np.where(np.isnan(div), budget, div), "-", color=color, alpha=0.4)
        ax.plot(lrs[~np.isnan(div)], div[~np.isnan(div)], marker, ms=size, color=color,
                label=f"{label_of(norm)}: diverged")
        ax.plot(lrs[np.isnan(div)], budget[np.isnan(div)], marker, ms=size, mfc="none",
                color=color, label=f"{label_of(norm)}: did not diverge (budget)")
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
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * (len(names) + 1)))
    colors = {"convolution": "tab:blue", "batch norm": "tab:red", "relu": "tab:green",
              "pooling": "tab:purple", "other": "tab:gray"}
    rows = names + ["paper: ResNet-50, Titan X Pascal (BN only)"]
    for i, name in enumerate(names):
        res = results[name]
        left = 0.0
        for cat, t in res["by_category"].items():
            share = 100 * t / res["total"]
            ax.barh(i, share, left=left, color=colors.get(cat, "tab:olive"),
                    label=cat if i == 0 else None)
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


# -- signal propagation and coherence (tinynorm.diagnostics; beyond the paper) ---------

def main_path(names, kinds):
    """Indices of the outputs along a network's main path: the first unit, then
    every residual block's output (ResNet); every unit where there are no blocks."""
    blocks = [i for i, k in enumerate(kinds) if k == "block"]
    return ([0] + blocks) if blocks else list(range(len(names)))


def _signal_rows(log):
    sig = log["signal"]
    if not len(sig.get("iteration", [])):
        return None
    names = sig.get("names", [])
    return sig, main_path(names, sig.get("kinds", ["unit"] * len(names)))


def _loss_at(log, it, window=10):
    its, loss = np.asarray(log["iter"].get("iteration", [])), np.asarray(log["iter"].get("loss", []))
    sel = (its > it - window) & (its <= it)
    if not sel.any() or its.max() < it:
        return np.nan
    return float(np.mean(loss[sel]))


def ablation_rows(logs: dict):
    """One dict per run: initial loss, RMS at init (first, middle, last output on
    the main path), loss at iterations 99 and 299 (10-iteration means), diverged_at."""
    rows = []
    for name, path in logs.items():
        log = read_log(path)
        row = dict(name=name, status=log["status"],
                   diverged_at=log["diverged_at"] if log["status"] == "diverged" else None,
                   loss0=float(log["iter"]["loss"][0]) if len(log["iter"].get("loss", [])) else np.nan,
                   loss100=_loss_at(log, 99), loss300=_loss_at(log, 299),
                   rms=(np.nan, np.nan, np.nan))
        sr = _signal_rows(log)
        if sr:
            sig, path_idx = sr
            rms0 = np.asarray(sig["rms"])[0][path_idx]
            row["rms"] = (rms0[0], rms0[len(rms0) // 2], rms0[-1])
        ep = log["epoch"]
        row["test_top1"] = float(ep["test_top1"][-1]) if len(ep.get("test_top1", [])) else np.nan
        rows.append(row)
    return rows


def ablation_table(logs: dict) -> str:
    """A Markdown table of :func:`ablation_rows`."""
    lines = ["| run | initial loss | RMS at init: first / middle / last | loss @100 | loss @300 "
             "| test top-1 @300 | diverged at |", "|---|---|---|---|---|---|---|"]
    for r in ablation_rows(logs):
        rms = " / ".join(f"{v:.3g}" for v in r["rms"])
        f = lambda v: "--" if not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
        top1 = "--" if not np.isfinite(r["test_top1"]) else f"{r['test_top1']:.1f}%"
        div = "no" if r["diverged_at"] is None else str(r["diverged_at"])
        lines.append(f"| {r['name']} | {f(r['loss0'])} | {rms} | {f(r['loss100'])} | "
                     f"{f(r['loss300'])} | {top1} | {div} |")
    return "\n".join(lines)


def _network_groups(logs):
    groups = {}
    for name, path in logs.items():
        net, _, variant = name.partition("_")
        groups.setdefault(net, {})[variant] = path
    return groups


_NETS = {"nv": "cifar10-nv", "resnet": "ResNet-50"}


def plot_ablation(logs: dict, out, title=""):
    """Per network (row): RMS along the main path at initialization, and the
    training loss over the iterations, one line per variant."""
    groups = _network_groups(logs)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.2 * len(groups)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (net, runs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] != "nv")):
        ax_rms, ax_loss = axes[row]
        for i, (variant, path) in enumerate(runs.items()):
            log = read_log(path)
            color = cmap(i % 10)
            label = variant + (f" (diverged @ {log['diverged_at']})"
                               if log["status"] == "diverged" else "")
            sr = _signal_rows(log)
            if sr:
                sig, idx = sr
                ax_rms.plot(range(len(idx)), np.asarray(sig["rms"])[0][idx], "o-", ms=3,
                            color=color, label=label)
            it, loss = log["iter"].get("iteration", []), log["iter"].get("loss", [])
            if len(loss):
                n = 10 if len(loss) >= 30 else 1
                ax_loss.plot(np.asarray(it)[n - 1:], _smooth(loss, n), color=color, label=label)
        ax_rms.set(yscale="log", xlabel="depth (first unit, then each residual block)"
                   if net == "resnet" else "depth (conv unit)",
                   ylabel="RMS of the output at initialization",
                   title=f"{_NETS.get(net, net)}: signal at initialization")
        ax_loss.axhline(np.log(10), color="k", ls=":", lw=1, label="ln 10 (chance)")
        ax_loss.set(yscale="log", xlabel="iteration", ylabel="training loss (10-it. mean)",
                    title=f"{_NETS.get(net, net)}: training loss")
        for ax in (ax_rms, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, out)


# the ablation's variant that runs each norm with today's defaults
DEFAULT_VARIANTS = {"none": "none_caffe", "wn": "wn_caffe_g1", "normprop": "normprop_s1.21",
                    "trelu": "trelu_res1"}


def plot_signal_by_depth(logs: dict, out, title="", variants=None):
    """RMS along the main path at initialization (dashed) and at the last record
    (solid), one line per norm, one panel per network.

    ``logs`` named ``<network>_<variant>`` (the ablation: ``variants`` maps a
    norm to the variant drawn for it, today's defaults unless given) or by norm
    alone (one experiment's runs: every run is drawn)."""
    if all(name.split("_")[0] in _NETS for name in logs):
        groups, variants = _network_groups(logs), variants or DEFAULT_VARIANTS
    else:
        groups, variants = {"": dict(logs)}, variants or {name: name for name in logs}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.3), squeeze=False)
    for ax, (net, runs) in zip(axes[0], sorted(groups.items(), key=lambda kv: kv[0] != "nv")):
        for norm, variant in variants.items():
            if variant not in runs:
                continue
            log = read_log(runs[variant])
            sr = _signal_rows(log)
            if not sr:
                continue
            sig, idx = sr
            rms = np.asarray(sig["rms"])
            last_it = int(sig["iteration"][-1])
            ax.plot(range(len(idx)), rms[0][idx], "--", color=color_of(norm),
                    label=f"{label_of(norm)}, iteration 0")
            if len(rms) > 1:
                ax.plot(range(len(idx)), rms[-1][idx], "-", color=color_of(norm),
                        label=f"{label_of(norm)}, iteration {last_it}")
        ax.axhline(1.0, color="k", ls=":", lw=1)
        ax.set(yscale="log", xlabel="depth (first unit, then each residual block)"
               if net == "resnet" else "depth (conv unit)", ylabel="RMS of the output",
               title=_NETS.get(net, net))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, out)


def plot_coherence(logs: dict, out, title="", max_iters=None):
    """The paper's footnote-2 coherence over training: per run, the median and
    the maximum over layers of max_{i!=j} |cos(w_i, w_j)|."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    cmap = plt.get_cmap("tab10")
    drawn = 0
    for i, (name, path) in enumerate(logs.items()):
        log = read_log(path)
        coh = log.get("coherence", {})
        if not len(coh.get("iteration", [])):
            continue
        its = np.asarray(coh["iteration"])
        vals = np.atleast_2d(np.asarray(coh["value"], float))
        if max_iters is not None:
            keep = its <= max_iters
            its, vals = its[keep], vals[keep]
        label = label_of(name) + (f" (diverged @ {log['diverged_at']})"
                                  if log["status"] == "diverged" else "")
        color = color_of(name) or cmap(i % 10)
        marker = "o" if len(its) < 3 else None
        # iteration + 1 on a log axis: runs that diverge within a few steps stay visible
        axes[0].plot(its + 1, np.nanmedian(vals, axis=1), color=color, label=label,
                     marker=marker)
        axes[1].plot(its + 1, np.nanmax(vals, axis=1), color=color, label=label, marker=marker)
        drawn += 1
    for ax, what in zip(axes, ("median over layers", "maximum over layers")):
        ax.set(xlabel="iteration + 1", xscale="log",
               ylabel="coherence max_{i!=j} |cos(w_i, w_j)|",
               title=f"weight coherence, {what}", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, out)


# -- experiments with seeds (runs named <variant>_s<seed>) ----------------------------

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def split_seed(name):
    """("bn", 2) for "bn_s2"; (name, None) for a name without a seed suffix."""
    m = re.match(r"^(.*)_s(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def group_seeds(logs: dict) -> dict:
    """{variant: {seed: path}}, variants in the order they first appear."""
    groups = {}
    for name, path in logs.items():
        variant, seed = split_seed(name)
        groups.setdefault(variant, {})[seed] = path
    return groups


# the paired comparisons of fig3_resnet50's data-rich runs (16k images x 10 epochs):
# BN against WN (R2), and each of the paper's remedies against WN (R3)
DATA_RICH_PAIRS = [("bn_16k", "wn_16k"), ("wn_dropout_16k", "wn_16k"), ("wn_wd5e-4_16k", "wn_16k")]


def split_variants(logs: dict, marker: str):
    """(runs whose variant lacks ``marker``, runs whose variant has it): e.g. a
    regime drawn in a figure of its own."""
    has = {k: v for k, v in logs.items() if marker in split_seed(k)[0]}
    return {k: v for k, v in logs.items() if k not in has}, has


def mean_ci(values):
    """(mean, half-width of the 95% t-interval; nan for a single value)."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return np.nan, np.nan
    if len(v) == 1:
        return float(v[0]), np.nan
    t = _T95[min(len(v) - 1, len(_T95)) - 1]
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(len(v)))


def _variant_label(variant):
    norm = variant.split("_")[0]
    rest = variant[len(norm):].lstrip("_")
    return label_of(norm) + (f" ({rest})" if rest else "")


def _variant_color(variant, i):
    cmap = plt.get_cmap("tab10")
    if variant in ("wn_dropout", "wn_wd5e-4"):
        return {"wn_dropout": "tab:olive", "wn_wd5e-4": "tab:cyan"}[variant]
    return color_of(variant.split("_")[0]) or cmap(i % 10)


def final_row(log):
    """The last evaluated epoch's numbers of one run."""
    ep = log["epoch"]
    top1 = np.asarray(ep.get("test_top1", []), float)
    ok = np.flatnonzero(np.isfinite(top1))
    if not len(ok):
        return dict(test=np.nan, clean=np.nan, gap=np.nan)
    i = ok[-1]
    clean = np.asarray(ep.get("train_top1_clean", [np.nan] * len(top1)), float)[i]
    return dict(test=float(top1[i]), clean=float(clean), gap=float(clean - top1[i]))


def seed_table(logs: dict, pairs=()) -> str:
    """A Markdown table per variant: every seed's final test top-1, clean
    training top-1 and gap (clean - test), mean ± 95% t-interval; then, for each
    (a, b) in ``pairs``, the per-seed paired differences a - b."""
    groups = group_seeds(logs)
    lines = ["| variant | seeds | status | test top-1 (each seed) | test mean ± 95% | clean train "
             "top-1 (each seed) | gap clean-test mean ± 95% |", "|---|---|---|---|---|---|---|"]
    finals = {}
    for variant, runs in groups.items():
        rows, statuses = {}, []
        for seed, path in sorted(runs.items(), key=lambda kv: (kv[0] is None, kv[0])):
            log = read_log(path)
            statuses.append(log["status"] + (f" @{log['diverged_at']}"
                                             if log["status"] == "diverged" else ""))
            rows[seed] = final_row(log)
        finals[variant] = rows
        f = lambda v: "--" if not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
        pm = lambda m, h: f(m) + ("" if not np.isfinite(h) else f" ± {h:.2f}")  # noqa: E731
        tests = [r["test"] for r in rows.values()]
        lines.append(f"| {variant} | {', '.join(str(s) for s in rows)} | "
                     f"{', '.join(sorted(set(statuses)))} | {', '.join(f(v) for v in tests)} | "
                     f"{pm(*mean_ci(tests))} | "
                     f"{', '.join(f(r['clean']) for r in rows.values())} | "
                     f"{pm(*mean_ci([r['gap'] for r in rows.values()]))} |")
    for a, b in pairs:
        if a not in finals or b not in finals:
            continue
        lines.append("")
        common = sorted(set(finals[a]) & set(finals[b]), key=lambda s: (s is None, s))
        if not common:
            lines.append(f"paired {a} - {b}: no seed run by both yet")
            continue
        for what in ("test", "clean", "gap"):
            diffs = [finals[a][s][what] - finals[b][s][what] for s in common]
            m, h = mean_ci(diffs)
            lines.append(f"paired {a} - {b}, {what} top-1 by seed "
                         f"({', '.join(str(s) for s in common)}): "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)}; mean {m:+.2f}"
                         + ("" if not np.isfinite(h) else f" ± {h:.2f} (95% t)"))
    return "\n".join(lines)


def plot_seeded_curves(logs: dict, out, title=""):
    """Per variant (one colour) and seed (one thin line each): the training loss,
    the clean training top-1 and the test top-1 at every evaluation, and the
    generalization gap (clean training top-1 - test top-1).  A run that diverged
    is drawn up to its divergence, marked x, and does not stretch the loss axis:
    the axis spans the runs that did not diverge."""
    groups = group_seeds(logs)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    finite_losses = []
    for i, (variant, runs) in enumerate(groups.items()):
        color = _variant_color(variant, i)
        label = _variant_label(variant) + (f", {len(runs)} seeds" if len(runs) > 1 else "")
        for j, (seed, path) in enumerate(sorted(runs.items(), key=lambda kv: (kv[0] is None,
                                                                              kv[0]))):
            log = read_log(path)
            it, ep = log["iter"], log["epoch"]
            lab = label if j == 0 else None
            diverged = log["status"] == "diverged"
            if diverged and lab:
                lab += f" (diverged @ it {log['diverged_at']})"
            loss = np.asarray(it.get("loss", []), float)
            if len(loss):
                n = max(1, len(loss) // 60)
                x = np.asarray(it["iteration"])[n - 1:]
                y = _smooth(np.where(np.isfinite(loss), loss, np.nan), n)
                axes[0].plot(x, y, color=color, lw=1, alpha=0.85, label=lab)
                if diverged:
                    axes[0].plot([log["diverged_at"]], [y[np.isfinite(y)][-1]
                                                        if np.isfinite(y).any() else 1.0],
                                 "x", color=color, ms=9, mew=2)
                else:
                    finite_losses.append(y[np.isfinite(y)])
            top1 = np.asarray(ep.get("test_top1", []), float)
            ok = np.isfinite(top1)
            if ok.any():
                e = np.asarray(ep["epoch"])[ok] + 1
                axes[2].plot(e, top1[ok], "o-", ms=3, color=color, lw=1, label=lab)
                clean = np.asarray(ep.get("train_top1_clean", np.full(len(top1), np.nan)),
                                   float)[ok]
                if np.isfinite(clean).any():
                    axes[1].plot(e, clean, "o-", ms=3, color=color, lw=1, label=lab)
                    axes[3].plot(e, clean - top1[ok], "o-", ms=3, color=color, lw=1, label=lab)
    if finite_losses:
        values = np.concatenate(finite_losses)
        values = values[values > 0]
        if len(values):
            axes[0].set_ylim(values.min() / 1.5, values.max() * 1.5)
    axes[0].set(xlabel="iteration", ylabel="loss on augmented batches (moving average)",
                yscale="log", title="training loss (train mode)")
    axes[1].set(xlabel="epoch", ylabel="top-1 on training images, %",
                title="clean training top-1 (eval mode)")
    axes[2].set(xlabel="epoch", ylabel="test top-1 accuracy, %", title="test top-1")
    axes[3].set(xlabel="epoch", ylabel="clean training top-1 - test top-1, points",
                title="generalization gap")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)


# -- the linear study's factorial (runs named <cell>_lr<lr>_s<seed>) ----------------------

def _cell_lr_seed(name, log):
    m = re.match(r"^(.*)_lr[^_]+_s(\d+)$", name)
    return m.group(1), float(log["config"]["lr"]), int(m.group(2))


def divergence_fractions(logs: dict) -> dict:
    """{cell: {lr: [diverged_at or None per seed, in seed order]}} (lr exact, from the log)."""
    cells = {}
    for name, path in logs.items():
        log = read_log(path)
        cell, lr, seed = _cell_lr_seed(name, log)
        at = log["diverged_at"] if log["status"] == "diverged" else None
        cells.setdefault(cell, {}).setdefault(lr, []).append((seed, at))
    return {cell: {lr: [at for _, at in sorted(runs)] for lr, runs in sorted(by_lr.items())}
            for cell, by_lr in cells.items()}


def plot_divergence_factorial(logs: dict, out, title=""):
    """Left: the fraction of seeds that diverged at each lr, one line per cell;
    right: the iterations to divergence of every diverged seed (median joined).
    x at the exact learning rates.  Returns a Markdown table."""
    table = divergence_fractions(logs)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    styles = {"wn": "-", "bn": ":", "none": "--"}
    cmap = plt.get_cmap("tab10")
    lines = ["| cell | lr | diverged / seeds | iterations to divergence |", "|---|---|---|---|"]
    for i, (cell, by_lr) in enumerate(table.items()):
        lrs = np.array(list(by_lr))
        frac = np.array([np.mean([a is not None for a in v]) for v in by_lr.values()])
        color = cmap(i % 10)
        ls = styles.get(cell.split("_")[0], "-")
        marker = "o" if "orth" in cell else "s"
        # cells that coincide would hide each other: each is shifted by a little
        offset = (i - (len(table) - 1) / 2) * 0.012
        axes[0].plot(lrs, frac + offset, ls, marker=marker, color=color, label=cell, ms=5)
        med = []
        for lr, v in by_lr.items():
            its = [a for a in v if a is not None]
            axes[1].plot([lr] * len(its), its, marker, color=color, ms=3, alpha=0.5)
            med.append(np.median(its) if its else np.nan)
            lines.append(f"| {cell} | {lr:.3g} | {len(its)} / {len(v)} | "
                         f"{', '.join(str(a) for a in its) if its else '--'} |")
        axes[1].plot(lrs, med, ls, marker=marker, mfc="none", color=color, label=cell)
    axes[0].set(xscale="log", xlabel="learning rate",
                ylabel="fraction of seeds that diverged (cells offset by 0.012)",
                ylim=(-0.08, 1.08), title="divergence by cell")
    axes[1].axhline(100, color="k", ls=":", lw=1, label="100 iterations (paper)")
    axes[1].set(xscale="log", yscale="log", xlabel="learning rate",
                ylabel="iteration of divergence (each seed; open: median)",
                title="when (seeds that diverged)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, out)
    return "\n".join(lines)


def end_to_end_gain(log):
    """(iterations, log(||x_L|| / ||x_0||)) from the signal group: the RMS of the
    network's last output against its input's ("input" kind), times the square
    root of their widths' ratio."""
    sig = log["signal"]
    kinds = list(sig.get("kinds", []))
    if "input" not in kinds or not len(sig.get("iteration", [])):
        return np.array([]), np.array([])
    rms = np.atleast_2d(np.asarray(sig["rms"], float))
    cfg = log["config"]
    width_in = cfg["crop"] * cfg["crop"] * (3 if cfg["dataset"] in ("imagenet", "cifar10") else 1)
    width_out = 10 if cfg["dataset"] != "imagenet" else 1000
    i0 = kinds.index("input")
    gain = np.log(rms[:, -1] / rms[:, i0]) + 0.5 * np.log(width_out / width_in)
    return np.asarray(sig["iteration"]), gain


def plot_gain_and_coherence(logs: dict, out, title=""):
    """One row per WN cell: the end-to-end gain and the median coherence over the
    50 layers against the iteration, one line per lr (a diverged run ends with x)."""
    groups = {}
    for name, path in logs.items():
        log = read_log(path)
        cell, lr, _ = _cell_lr_seed(name, log)
        if cell.startswith("wn"):
            groups.setdefault(cell, []).append((lr, log))
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.4 * len(groups)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (cell, runs) in enumerate(sorted(groups.items())):
        runs.sort(key=lambda r: r[0])
        for j, (lr, log) in enumerate(runs):
            color = cmap(j / max(1, len(runs) - 1))
            its, gain = end_to_end_gain(log)
            coh = log.get("coherence", {})
            label = f"lr {lr:.2g}" + (f" (diverged @ {log['diverged_at']})"
                                      if log["status"] == "diverged" else "")
            if len(its):
                ok = np.isfinite(gain)
                axes[row][0].plot(its[ok] + 1, gain[ok], color=color, lw=1, label=label)
                if log["status"] == "diverged" and ok.any():
                    axes[row][0].plot(its[ok][-1] + 1, gain[ok][-1], "x", color=color)
            if len(coh.get("iteration", [])):
                vals = np.atleast_2d(np.asarray(coh["value"], float))
                axes[row][1].plot(np.asarray(coh["iteration"]) + 1, np.nanmedian(vals, axis=1),
                                  color=color, lw=1, label=label)
        axes[row][0].set(xscale="log", xlabel="iteration + 1", ylabel="log(||x_L|| / ||x_0||)",
                         title=f"{cell}: end-to-end gain on the batch")
        axes[row][1].set(xscale="log", xlabel="iteration + 1",
                         ylabel="median over layers of max_{i!=j} |cos|", ylim=(0, 1.02),
                         title=f"{cell}: weight coherence (footnote 2)")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)

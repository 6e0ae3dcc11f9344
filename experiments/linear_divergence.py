"""Section 5: a 50-layer linear network (no bias, 64 units per hidden layer).

The paper's claim (R5): with WN, "with a wide range of learning rates the
network completely diverged in less than a hundred iterations" (ImageNet),
"due to the broken orthogonality" of the weights.

The study is a factorial, so that what makes the network diverge can be told
apart from what WN does.  For every learning rate of a log-spaced grid, with
plain SGD + momentum 0.9 at a constant lr for at most ``max_iters`` iterations,
every cell below runs with several seeds and records the iteration at which
the run diverged (non-finite loss or weights, or loss above ``diverge_loss``),
or that it did not:

  WN:       init {caffe_xavier (the paper's Caffe filler), orthogonal (Saxe et
            al. 2014: every layer's singular values 1)} x WN's g {learned from
            1 ("g1"), fixed at 1 ("gfrozen": w = v / ||v||)};
  controls: no normalization and BN, with either init.

A deep linear network with Gaussian or uniform layers has an end-to-end gain
far from 1 before any training (its width would have to grow with depth);
orthogonal layers keep it at 1.  Row-normalizing (WN) makes every filter unit
norm but leaves the rows' directions as the init drew them: a 64x64 uniform
matrix's rows are 0.43-coherent at init (max |cos| over pairs), an orthogonal
one's are 0.

Recorded for every run: every layer's weight coherence (footnote 2) and the
RMS of every layer's output and of the input (``signal``), every iteration for
seed 0 and every 10 iterations for the other seeds (the logs stay small); the
end-to-end gain log(||x_L|| / ||x_0||) on the batch follows from the RMS.  For
seed 0 of every cell and lr, ``svd.json`` holds the largest and smallest
singular value of the product of the 48 hidden layers' row-normalized weight
matrices at initialization and, for a run that diverged at iteration k, of the
weights that iteration k-1 used (a re-run to k-1 iterations: the runs are
deterministic).

Presets:
  paper: ImageNet inputs flattened (3x224x224 centre crops), batch 256, 9 lrs.
  cpu:   Fashion-MNIST 28x28 flattened, per-pixel normalized, batch 128, 10
         lrs from 1e-4 to 1, 300 iterations at most, seeds 0-4 (--seeds).
  smoke: 3 lrs, 20 iterations, 1024 images, one seed, four cells.

    python experiments/linear_divergence.py --preset cpu [--seeds 0,1,2,3,4]
"""
import json

from common import figure_path, log_dir, parse_args, run_variants, seeded
import numpy as np  # after common, which imports tinynorm first (OPENBLAS_THREAD_TIMEOUT)

INITS = {"xavier": "caffe_xavier", "orth": "orthogonal"}
# (name, norm, init, wn_g_init)
CELLS = ([(f"wn_{i}_{g}", "wn", init, {"g1": "one", "gfrozen": "frozen"}[g])
          for i, init in INITS.items() for g in ("g1", "gfrozen")]
         + [(f"{norm}_{i}", norm, init, "one") for norm in ("none", "bn")
            for i, init in INITS.items()])
COMMON = dict(model="deep_linear", depth=50, linear_width=64, schedule="constant",
              momentum=0.9, weight_decay=0.0, augment=False, eval_every=10**6,
              clean_eval_size=0, diverge_loss=100.0)

PRESETS = {
    "paper": dict(dataset="imagenet", batch_size=256, crop=224, pad=0, epochs=1000,
                  max_iters=1000, lrs=np.logspace(-4, 0, 9)),
    "cpu": dict(dataset="fashion-mnist", min_std=10.0, batch_size=128, crop=28, pad=0,
                epochs=1000, max_iters=300, lrs=np.logspace(-4, 0, 10)),
    "smoke": dict(dataset="fashion-mnist", min_std=10.0, batch_size=64, crop=28, pad=0,
                  epochs=1000, max_iters=20, train_limit=1024, test_limit=200,
                  lrs=np.logspace(-3, 0, 3)),
}
SEEDS = {"paper": (0,), "cpu": (0, 1, 2, 3, 4), "smoke": (0,)}
SMOKE_CELLS = ("wn_xavier_g1", "wn_orth_gfrozen", "bn_xavier", "none_xavier")


def variants(preset, seeds=None):
    settings = dict(PRESETS[preset])
    lrs = settings.pop("lrs")
    cells = [c for c in CELLS if preset != "smoke" or c[0] in SMOKE_CELLS]
    runs = {}
    for seed in seeds or SEEDS[preset]:
        every = 1 if seed == seeds_first(seeds, preset) else 10
        for name, norm, init, g in cells:
            for lr in lrs:
                runs.update(seeded({f"{name}_lr{lr:.0e}": dict(
                    COMMON, norm=norm, init=init, wn_g_init=g, lr=float(lr),
                    track_norms_every=every, track_signal_every=every, **settings)}, (seed,)))
    return runs


def seeds_first(seeds, preset):
    return (seeds or SEEDS[preset])[0]


def product_singular_values(model):
    """(largest, smallest) singular value of the product of the hidden square
    layers' weight matrices with every row divided by its norm (the
    directions WN normalizes; g and BN's scales left out).  In float64: a
    smallest value below ~1e-16 of the largest is round-off."""
    mats = []
    for name, layer in model.named_layers():
        w = layer.params.get("v", layer.params.get("w")) if hasattr(layer, "params") else None
        if w is None or w.ndim != 2 or w.shape[0] != w.shape[1]:
            continue
        w = np.asarray(w, np.float64)
        mats.append(w / np.linalg.norm(w, axis=1, keepdims=True))
    prod = np.eye(mats[0].shape[0])
    for w in mats:
        prod = w @ prod
    s = np.linalg.svd(prod, compute_uv=False)
    return float(s[0]), float(s[-1]), len(mats)


def singular_value_table(runs, logs, args):
    """svd.json: for seed 0 of every cell and lr, the product's singular values
    at init and, for a diverged run, one step before its divergence.  Rank 0's
    work under mpirun: its re-runs are single-process runs."""
    from pathlib import Path
    from tinynorm.parallel import SingleProcess
    from tinynorm.train import Trainer, read_log
    alone = SingleProcess()
    first = seeds_first(args.seeds, args.preset)
    out = {}
    for name, path in logs.items():
        if not name.endswith(f"_s{first}"):
            continue
        log = read_log(path)
        cfg = dict(runs[name], out=str(Path(args.runs) / args.preset / "linear_svd" / name),
                   progress=False, device="cpu")
        if args.data_root:
            cfg["data_root"] = args.data_root
        row = {"status": log["status"], "diverged_at": log["diverged_at"]}
        init = Trainer(dict(cfg, max_iters=1), resume=False, overwrite=True, comm=alone)
        row["init"] = product_singular_values(init.model)[:2]
        k = log["diverged_at"]
        if log["status"] == "diverged" and k >= 2:
            before = Trainer(dict(cfg, max_iters=k - 1), resume=False, overwrite=True,
                             comm=alone)
            before.run()
            row["before_divergence"] = product_singular_values(before.model)[:2]
            row["before_divergence_iteration"] = k - 1
        out[name] = row
    return out


def main():
    args = parse_args(__doc__)
    runs = variants(args.preset, args.seeds)
    logs = run_variants("linear_divergence", runs, args)
    if logs:
        from plots.figures import plot_divergence_factorial, plot_gain_and_coherence
        dest = log_dir(args.preset, "linear_divergence", args.runs)
        svd_path = dest / "svd.json"
        svd = json.loads(svd_path.read_text()) if svd_path.exists() else {}
        missing = {k: v for k, v in logs.items() if k not in svd}
        if missing and not args.plot_only:
            svd.update(singular_value_table(runs, missing, args))
            svd_path.write_text(json.dumps(svd, indent=1, sort_keys=True))
        out = figure_path(args.preset, "linear_divergence", args.runs, "linear_divergence")
        table = plot_divergence_factorial(logs, out, title=f"50-layer linear network "
                                                           f"({args.preset} preset)")
        print(table)
        out2 = figure_path(args.preset, "linear_divergence", args.runs, "linear_coherence")
        plot_gain_and_coherence({k: v for k, v in logs.items()
                                 if k.endswith(f"_s{seeds_first(args.seeds, args.preset)}")},
                                out2, title=f"50-layer linear network: end-to-end gain and "
                                            f"coherence ({args.preset} preset, first seed)")
        print(f"figures: {out}, {out2}")


if __name__ == "__main__":
    main()

"""The seed statistics of the experiment tables and figures (plots.figures)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plots import figures  # noqa: E402


def test_mean_and_95_percent_t_interval_by_hand():
    m, h = figures.mean_ci([70.0, 72.0, 74.0])
    # mean 72, sample std 2, t(0.975, 2 dof) = 4.303: 4.303 * 2 / sqrt(3)
    assert m == 72.0 and h == pytest.approx(4.303 * 2 / np.sqrt(3))
    assert figures.mean_ci([70.0]) == (70.0, pytest.approx(np.nan, nan_ok=True))
    assert figures.mean_ci([70.0, np.nan, 74.0])[0] == 72.0        # a NaN seed is left out
    m, h = figures.mean_ci([1.0, 3.0])
    assert h == pytest.approx(12.706 * np.sqrt(2) / np.sqrt(2))


def test_seed_names_group_by_variant():
    assert figures.split_seed("wn_wd5e-4_s2") == ("wn_wd5e-4", 2)
    assert figures.split_seed("bn") == ("bn", None)
    groups = figures.group_seeds({"bn_s0": "a", "wn_s0": "b", "bn_s1": "c"})
    assert list(groups) == ["bn", "wn"] and groups["bn"] == {0: "a", 1: "c"}


def _log(test, clean, status="completed"):
    return {"status": status, "diverged_at": 7,
            "epoch": {"test_top1": np.array([50.0, np.nan, test]),
                      "train_top1_clean": np.array([55.0, np.nan, clean])}}


def test_table_has_every_seed_and_the_paired_differences(monkeypatch):
    logs = {"bn_s0": _log(70, 99), "bn_s1": _log(72, 100), "wn_s0": _log(66, 100),
            "wn_s1": _log(69, 99.5), "trelu_s0": _log(60, 80, "diverged")}
    monkeypatch.setattr(figures, "read_log", lambda path: path)
    table = figures.seed_table(logs, pairs=[("bn", "wn")])
    assert "| bn | 0, 1 | completed | 70.00, 72.00 | 71.00 ± 12.71 | 99.00, 100.00 |" in table
    assert "| trelu | 0 | diverged @7 | 60.00 | 60.00 | 80.00 | 20.00 |" in table
    assert "paired bn - wn, test top-1 by seed (0, 1): +4.00, +3.00; mean +3.50 ± 6.35" in table
    # a pair whose seeds do not overlap (yet) says so instead of a NaN mean
    table = figures.seed_table({"bn_s0": _log(70, 99), "wn_s1": _log(69, 99.5)},
                               pairs=[("bn", "wn")])
    assert "paired bn - wn: no seed run by both yet" in table and "nan" not in table


def test_output_rms_divides_by_the_probed_layers_sizes():
    from tinynorm.train import make_config
    # ResNet-50 at width 0.25 on 28x28: the stem has 16 channels at 28x28, the last
    # block 2048 * 0.25 = 512 channels at 4x4 (28 -> 14 -> 7 -> 4)
    sizes = figures.probe_elements(make_config(dict(model="resnet50", norm="bn", width=0.25,
                                                    crop=28)))
    assert sizes == {"first": 16 * 28 * 28, "last": 512 * 4 * 4}
    sizes = figures.probe_elements(make_config(dict(model="cifar10_nv", norm="wn", width=0.25,
                                                    crop=28, dataset="cifar10")))
    assert sizes["last"] == 10 * 5 * 5      # conv9: the classes at 5x5, pooled after

"""Signal propagation (RMS/mean by depth) and weight coherence, against direct NumPy."""
import json
import math

import numpy as np
import pytest

from tinynorm.diagnostics import SignalRecorder, coherence, measure_signal, weight_coherences
from tinynorm.models import cifar10_nv, resnet
from tinynorm.train import Trainer, read_log, upgrade_config

from data_markers import needs_fmnist


def coherence_by_loops(w):
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    best = -1.0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i != j:
                c = abs(rows[i] @ rows[j]) / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
                best = max(best, c)
    return best


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (7, 4), (2, 9)])
def test_coherence_matches_the_definition(shape):
    w = np.random.default_rng(0).standard_normal(shape)
    assert coherence(w) == pytest.approx(coherence_by_loops(w), rel=1e-12)


def test_coherence_of_orthogonal_parallel_and_degenerate_filters():
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))
    assert coherence(q * np.arange(1, 7)[:, None]) < 1e-12        # row scales do not matter
    w = np.random.default_rng(2).standard_normal((4, 5))
    w[3] = -2.5 * w[1]
    assert coherence(w) == pytest.approx(1.0)
    assert math.isnan(coherence(np.ones((1, 5))))
    z = np.random.default_rng(3).standard_normal((3, 5))
    z[0] = 0.0                                                     # a zero row has no direction
    assert coherence(z) == pytest.approx(coherence_by_loops(z[1:]))


def test_weight_coherences_cover_every_conv_and_linear_layer():
    model = resnet("wn", (1, 1), 10, "cifar", 1 / 16, 1)
    names, values = weight_coherences(model)
    layers = dict(model.named_layers())
    expected = [n for n, l in model.named_layers() if "v" in l.params or "w" in l.params]
    assert names == expected and len(names) == 1 + 4 + 4 + 1   # stem, 2 blocks of 3 + shortcut, fc
    for name, value in zip(names, values):
        layer = layers[name]
        w = layer.params.get("w", layer.params.get("v"))
        assert value == pytest.approx(coherence_by_loops(w), rel=1e-10, nan_ok=True)


@pytest.mark.parametrize("norm", ["none", "bn", "wn", "normprop", "trelu"])
def test_signal_of_cifar10_nv_units_against_a_manual_forward(norm):
    model = cifar10_nv(norm, 1, 10, width=1 / 16, seed=4)
    x = np.random.default_rng(5).standard_normal((6, 1, 28, 28)).astype(np.float32)
    result = measure_signal(model, x)
    # the same forward by hand: the output of each conv unit is its Sequential's output
    h, expected = x, []
    model.train()
    for name, layer in model.children.items():
        h = layer(h)
        if name.startswith("conv"):
            h64 = h.astype(np.float64)
            expected.append((name, np.sqrt((h64 ** 2).mean()), h64.mean()))
    assert [n.split(".")[0] for n in result["name"]] == [e[0] for e in expected]
    assert set(result["kind"]) == {"unit"}
    np.testing.assert_allclose(result["rms"], [e[1] for e in expected], rtol=1e-10)
    np.testing.assert_allclose(result["mean"], [e[2] for e in expected], rtol=1e-9, atol=1e-12)


def test_signal_of_resnet_blocks_and_units_in_forward_order():
    model = resnet("bn", (1, 1), 10, "cifar", 1 / 16, 1, bn_chunk=None, seed=2)
    x = np.random.default_rng(1).standard_normal((4, 1, 12, 12)).astype(np.float32)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    result = measure_signal(model, x)
    # stem, then per block its 3 branch units (+ shortcut unit), then the block
    assert result["name"] == ["stem.2", "layer1.0.branch.2", "layer1.0.branch.5",
                              "layer1.0.branch.7", "layer1.0.shortcut.1", "layer1.0",
                              "layer2.0.branch.2", "layer2.0.branch.5", "layer2.0.branch.7",
                              "layer2.0.shortcut.1", "layer2.0"]
    assert result["kind"].count("block") == 2
    # measuring does not change the model: BN's running statistics are restored
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    model.train()
    out = model.children["layer1.0"](model.children["stem"](x)).astype(np.float64)
    assert result["rms"][5] == pytest.approx(float(np.sqrt((out ** 2).mean())), rel=1e-10)


def test_recorder_records_nothing_outside_its_scope():
    model = cifar10_nv("none", 1, 10, width=1 / 16)
    x = np.zeros((2, 1, 28, 28), np.float32)
    rec = SignalRecorder(model)
    assert len(rec) == 9
    with rec:
        model(x)
    assert len(rec.names) == 9
    model(x)
    assert len(rec.names) == 9
    assert all(getattr(l, "_signal_hook", None) is None for _, l in model.named_layers())


def test_legacy_logs_read_as_the_inits_they_ran():
    old = upgrade_config({"model": "resnet50", "norm": "trelu"})
    assert (old["init"], old["wn_g_init"], old["normprop_scale"]) == ("glorot", "norm", 1.0)
    assert old["residual_scale"] == pytest.approx(1 / math.sqrt(2))
    assert "residual_scale" not in upgrade_config({"model": "cifar10_nv", "norm": "wn"})
    assert upgrade_config({"init": "xavier"})["init"] == "glorot"
    new = {"init": "caffe_xavier", "wn_g_init": "one", "normprop_scale": 1.21}
    assert upgrade_config(new) == new


SMALL = dict(model="resnet50", norm="wn", dataset="fashion-mnist", width=1 / 16,
             train_limit=256, test_limit=100, batch_size=32, lr=0.01, epochs=1,
             max_iters=5, progress=False, seed=3, min_std=10.0, track_signal_every=2)


@needs_fmnist
def test_trainer_records_signal_and_coherence(tmp_path):
    t = Trainer(dict(SMALL, out=str(tmp_path / "run")))
    x0, _ = t.data.train_batch(0, 0)
    fresh = measure_signal(t.model, x0)
    names0, coh0 = weight_coherences(t.model)
    assert t.run() == "completed"
    log = read_log(tmp_path / "run")
    sig, coh = log["signal"], log["coherence"]
    np.testing.assert_array_equal(sig["iteration"], [0, 2, 4])
    assert sig["rms"].shape == sig["mean"].shape == (3, len(fresh["name"]))
    assert sig["names"] == fresh["name"] and sig["kinds"] == fresh["kind"]
    np.testing.assert_allclose(sig["rms"][0], fresh["rms"], rtol=1e-12)
    assert coh["names"] == names0 and coh["value"].shape == (3, len(names0))
    np.testing.assert_allclose(coh["value"][0], coh0, rtol=1e-12)
    assert not np.allclose(coh["value"][2], coh["value"][0])      # the weights moved


@needs_fmnist
def test_cli_signal_prints_and_writes_the_measurement(tmp_path, capsys):
    from tinynorm.cli import main
    args = ["signal", "--model", "cifar10_nv", "--norm", "normprop", "--width", "0.0625",
            "--train-limit", "256", "--batch-size", "16", "--min-std", "10",
            "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "conv9" in out and "normprop_scale=1.21" in out
    data = json.loads((tmp_path / "s.json").read_text())
    t = Trainer(dict(model="cifar10_nv", norm="normprop", width=0.0625, train_limit=256,
                     batch_size=16, min_std=10.0, progress=False, out=str(tmp_path / "x")))
    x, _ = t.data.train_batch(0, 0)
    np.testing.assert_allclose(data["signal"]["rms"], measure_signal(t.model, x)["rms"],
                               rtol=1e-12)
    # a run directory's checkpoint: the trained weights
    cfg = dict(SMALL, model="cifar10_nv", out=str(tmp_path / "run"))
    Trainer(cfg).run()
    assert main(["signal", str(tmp_path / "run"), "--json", str(tmp_path / "r.json")]) == 0
    assert "iteration 5" in capsys.readouterr().out
    trained = json.loads((tmp_path / "r.json").read_text())["signal"]["rms"]
    logged = read_log(tmp_path / "run")["signal"]["rms"][0]
    assert len(trained) == len(logged) and not np.allclose(trained, logged)

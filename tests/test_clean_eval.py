"""The clean training evaluation (eval mode, no augmentation, fixed training
images) and ResNet's dropout before the classifier."""
import math

import numpy as np
import pytest

from tinynorm.cli import main as cli_main
from tinynorm.runconfig import ConfigError
from tinynorm.train import Trainer, _Data, evaluate, make_config, read_log


def _trainer(synthetic_dataset, tmp_path, n_train=160, **cfg):
    cfg = make_config(dict(dict(model="cifar10_nv", norm="bn", width=1 / 16, batch_size=32,
                                epochs=2, lr=0.01, progress=False, out=str(tmp_path / "run")),
                           **cfg))
    return Trainer(cfg, _Data(cfg, dataset=synthetic_dataset(n_train=n_train, n_test=48)))


def test_clean_evaluation_is_eval_mode_on_the_unaugmented_training_images(synthetic_dataset,
                                                                           tmp_path):
    t = _trainer(synthetic_dataset, tmp_path)
    assert t.run() == "completed"
    ep = read_log(tmp_path / "run")["epoch"]
    assert len(ep["train_top1_clean"]) == 2 and np.all(np.isfinite(ep["train_loss_clean"]))
    # at most clean_eval_size images: the whole training subset, every image once
    assert t.data.train_clean is t.data.train
    by_hand = evaluate(t.model, t.data.test_batches(t.cfg["eval_batch_size"], t.data.train))
    assert ep["train_loss_clean"][-1] == pytest.approx(by_hand[0], rel=1e-12)
    assert ep["train_top1_clean"][-1] == by_hand[1]
    # not the running mean over augmented batches in train mode
    assert ep["train_loss_clean"][-1] != ep["train_loss"][-1]


def test_a_larger_training_set_is_evaluated_on_a_fixed_subset(synthetic_dataset, tmp_path):
    t = _trainer(synthetic_dataset, tmp_path, n_train=192, clean_eval_size=64)
    again = _trainer(synthetic_dataset, tmp_path / "b", n_train=192, clean_eval_size=64)
    assert len(t.data.train_clean) == 64
    a = np.concatenate([y for _, y in t.data.clean_train_batches(50)])
    b = np.concatenate([y for _, y in again.data.clean_train_batches(50)])
    np.testing.assert_array_equal(a, b)                  # the same images, run after run
    off = _trainer(synthetic_dataset, tmp_path / "off", clean_eval_size=0)
    assert off.data.clean_train_batches(50) is None
    assert off.run() == "completed"
    assert np.all(np.isnan(read_log(tmp_path / "off" / "run")["epoch"]["train_top1_clean"]))


def test_an_earlier_checkpoint_without_the_clean_series_resumes(synthetic_dataset, tmp_path):
    t = _trainer(synthetic_dataset, tmp_path, max_iters=5)     # stops in epoch 1 of 2
    assert t.run() == "completed"
    t.log["epoch"]["train_loss_clean"].clear()                  # as a checkpoint of before
    t.log["epoch"]["train_top1_clean"].clear()
    t.save_checkpoint()
    resumed = _trainer(synthetic_dataset, tmp_path)
    resumed.load_checkpoint()
    ep = resumed.log["epoch"]
    assert len(ep["train_top1_clean"]) == len(ep["epoch"]) == 1
    assert math.isnan(ep["train_top1_clean"][0])


def test_eval_command_prints_the_clean_training_accuracy_and_the_gap(tmp_path, capsys):
    from data_markers import HAVE_FMNIST
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "r"
    assert cli_main(["train", "--model", "deep_linear", "--norm", "bn", "--depth", "3",
                     "--train-limit", "256", "--test-limit", "200", "--batch-size", "64",
                     "--epochs", "1", "--clean-eval-size", "100", "--out", str(out),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert "clean training loss" in text and "(100 training images, eval mode" in text
    assert "gap" in text


def test_dropout_masks_in_training_only_and_only_for_resnet(synthetic_dataset, tmp_path):
    from tinynorm.models import build_model
    m = build_model("resnet50", "wn", in_channels=1, num_classes=10, width=1 / 16, dropout=0.5)
    names = [n for n, _ in m.named_layers()]
    assert names[-3:] == ["pool", "dropout", "fc"] and m.probe_layers["last"] == "layer4.2"
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    m.eval()
    a, b = m(x), m(x)
    np.testing.assert_array_equal(a, b)                  # eval: no masks
    m.train()
    assert not np.array_equal(m(x), m(x))                # train: a new mask per forward
    with pytest.raises(ConfigError, match="'dropout' applies to resnet50"):
        _trainer(synthetic_dataset, tmp_path, dropout=0.3)

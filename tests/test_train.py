"""Training on real Fashion-MNIST: learning, resume, divergence, logs, CLI."""
import os
import signal

import h5py
import numpy as np
import pytest

from tinynorm.cli import main as cli_main
from tinynorm.train import Trainer, make_config, read_log

from data_markers import needs_fmnist

pytestmark = needs_fmnist

SMALL = dict(model="cifar10_nv", norm="bn", dataset="fashion-mnist", width=1 / 16,
             train_limit=1024, test_limit=500, batch_size=64, lr=0.05, schedule="linear",
             lr_final=1e-3, epochs=2, progress=False, seed=3)


def test_training_lowers_the_loss_and_beats_chance(tmp_path):
    # 2048 images: with 1024 the last epoch ended at 38-45% (it moves with the
    # conv plans' summation order, e.g. with the thread count), too near 40%
    trainer = Trainer(dict(SMALL, width=1 / 8, batch_size=32, lr=0.05, epochs=3,
                           train_limit=2048, out=str(tmp_path / "run")))
    assert trainer.run() == "completed"
    log = read_log(tmp_path / "run")
    loss = log["iter"]["loss"]
    assert np.mean(loss[-10:]) < 0.75 * np.mean(loss[:10])
    assert log["epoch"]["test_top1"][-1] > 40.0          # chance is 10%
    assert log["epoch"]["test_top5"][-1] >= log["epoch"]["test_top1"][-1]
    assert log["config"]["norm"] == "bn" and log["status"] == "completed"


def test_resume_gives_exactly_the_uninterrupted_numbers(tmp_path):
    cfg = dict(SMALL, norm="wn", train_limit=512)
    full = Trainer(dict(cfg, out=str(tmp_path / "full")))
    full.run()
    # stop after the first epoch's checkpoint, then resume in a new Trainer
    part = Trainer(dict(cfg, out=str(tmp_path / "part"), max_iters=8))
    assert part.run() == "completed"
    resumed = Trainer(dict(cfg, out=str(tmp_path / "part")))
    resumed.load_checkpoint()
    assert resumed.opt.iteration == 8
    resumed.status = "running"
    resumed._loop()
    a, b = full.log["iter"]["loss"], resumed.log["iter"]["loss"]
    assert len(a) == len(b) == 16
    np.testing.assert_array_equal(a, b)
    for name, p in full.model.parameters().items():
        np.testing.assert_array_equal(p, resumed.model.parameters()[name], err_msg=name)


def test_interrupt_mid_epoch_saves_and_resume_matches(tmp_path):
    cfg = dict(SMALL, norm="bn", train_limit=512, epochs=1)
    full = Trainer(dict(cfg, out=str(tmp_path / "full")))
    full.run()
    run = Trainer(dict(cfg, out=str(tmp_path / "int")))
    original_step = run.opt.step

    def step_then_interrupt():
        lr = original_step()
        if run.opt.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C does
        return lr
    run.opt.step = step_then_interrupt
    assert run.run() == "interrupted"
    assert read_log(tmp_path / "int")["status"] == "interrupted"
    with h5py.File(tmp_path / "int" / "checkpoint.h5") as f:
        assert (f.attrs["epoch"], f.attrs["batch"]) == (0, 3)
    again = Trainer(dict(cfg, out=str(tmp_path / "int")))
    assert again.run(resume=True) == "completed"
    np.testing.assert_array_equal(full.log["iter"]["loss"], again.log["iter"]["loss"])


def test_absurd_lr_ends_as_diverged_with_a_readable_log(tmp_path):
    trainer = Trainer(dict(SMALL, norm="none", lr=1e4, schedule="constant",
                           out=str(tmp_path / "div")))
    assert trainer.run() == "diverged"
    log = read_log(tmp_path / "div")
    assert log["status"] == "diverged" and 0 <= log["diverged_at"] < 16
    assert len(log["iter"]["loss"]) == log["diverged_at"] + 1
    assert log["diverged_reason"]


def test_cli_train_with_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nmodel = "deep_linear"\nnorm = "wn"\ndepth = 4\nepochs = 1\n'
                   'train_limit = 256\ntest_limit = 200\nbatch_size = 64\nlr = 0.5\n'
                   'augment = false\n')
    out = tmp_path / "cli"
    assert cli_main(["train", "--config", str(cfg), "--lr", "0.01", "--out", str(out),
                     "--no-progress"]) == 0
    log = read_log(out)
    assert log["config"]["lr"] == 0.01 and log["config"]["depth"] == 4
    assert log["config"]["model"] == "deep_linear"
    assert cli_main(["eval", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out


def test_unknown_config_key_is_rejected():
    with pytest.raises(KeyError, match="unknown configuration key 'lrr'"):
        make_config({"lrr": 0.1})


def test_corrupt_log_is_a_clear_error(tmp_path):
    bad = tmp_path / "log.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        read_log(bad)


def test_output_norms_are_tracked(tmp_path):
    trainer = Trainer(dict(SMALL, norm="wn", epochs=1, train_limit=256, track_norms_every=2,
                           out=str(tmp_path / "n")))
    trainer.run()
    norms = read_log(tmp_path / "n")["norms"]
    assert list(norms["iteration"]) == [0, 2]
    assert np.all(norms["first"] > 0) and np.all(norms["last"] > 0)


def test_cli_resume_takes_the_runs_own_configuration(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--model", "deep_linear", "--norm", "bn", "--depth", "3", "--epochs", "2",
            "--train-limit", "256", "--test-limit", "200", "--batch-size", "64",
            "--lr", "0.01", "--max-iters", "4", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert read_log(out)["status"] == "completed" and len(read_log(out)["iter"]["loss"]) == 4
    # only --out, --resume and the new limit: depth, norm, lr... come from the run
    assert cli_main(["train", "--out", str(out), "--resume", "--max-iters", "8",
                     "--no-progress"]) == 0
    log = read_log(out)
    assert log["config"]["depth"] == 3 and log["config"]["norm"] == "bn"
    assert len(log["iter"]["loss"]) == 8
    assert cli_main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "tinynorm: error: nothing to resume" in capsys.readouterr().err

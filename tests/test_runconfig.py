"""The run configuration's one table (tinynorm.runconfig): what a row gives, the
command-line flags derived from it, a norm's own options, earlier log formats."""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from tinynorm import nn, norms, runconfig
from tinynorm.cli import build_parser
from tinynorm.models import build_model
from tinynorm.runconfig import ConfigError, Key, integer, real
from tinynorm.train import DEFAULTS, make_config, read_log

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_one_row_is_a_default_a_check_a_flag_and_a_resume_policy():
    runconfig.add_key(Key("test_knob", 3, integer(1), "a knob of this test", resume=True))
    try:
        assert DEFAULTS["test_knob"] == 3 and make_config()["test_knob"] == 3
        assert runconfig.validate(make_config({"test_knob": 5}))["test_knob"] == 5
        with pytest.raises(ConfigError, match="configuration key 'test_knob' must be an integer"):
            runconfig.validate(make_config({"test_knob": 0}))
        assert "test_knob" in runconfig.RESUME_ALLOWED
        assert runconfig.SPECS["test_knob"][1] == "allowed"
        assert parse("train", "--test-knob", "7").test_knob == 7
        assert "test-knob" in build_parser()._subparsers._group_actions[0].choices[
            "train"].format_help()
    finally:
        runconfig.remove_key("test_knob")
    assert "test_knob" not in DEFAULTS and "test_knob" not in runconfig.RESUME_ALLOWED
    with pytest.raises(SystemExit):
        parse("train", "--test-knob", "7")


def test_a_builtin_row_cannot_be_replaced_or_removed():
    with pytest.raises(ValueError, match="already exists"):
        runconfig.add_key(Key("lr", 0.1, real(gt=0)), replace=True)
    with pytest.raises(ValueError, match="built in"):
        runconfig.remove_key("lr")
    with pytest.raises(ValueError, match="default"):
        runconfig.add_key(Key("test_bad_default", 0, integer(1)))


def test_every_key_is_a_train_flag_crop_and_pad_included():
    train = parse("train")
    for key in runconfig.KEYS:
        assert getattr(train, key) is None          # not given: the file or checkpoint decides
    args = parse("train", "--crop", "24", "--pad", "0", "--no-flip", "--ddi", "--no-augment",
                 "--no-progress", "--residual-scale", "0.5", "--bn-chunk", "16")
    assert (args.crop, args.pad, args.flip, args.ddi, args.augment, args.progress) == \
        (24, 0, False, True, False, False)
    assert (args.residual_scale, args.bn_chunk) == (0.5, 16)
    assert parse("train", "--residual-scale", "auto").residual_scale == "auto"
    assert parse("train", "--augment", "--flip").flip is True


def test_the_resume_help_names_every_key_that_may_change():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    resume = next(a for a in train._actions if a.dest == "resume")
    named = resume.help.split("(only ")[1].split(" may change")[0].split(", ")
    assert named == [runconfig.KEYS[k].flag[2:] for k in runconfig.RESUME_ALLOWED]
    assert len(named) == len(runconfig.RESUME_ALLOWED) >= 11


def test_profile_takes_the_model_section_with_its_own_model_default():
    args = parse("profile")
    assert args.model == "resnet50" and args.norm == DEFAULTS["norm"]
    assert args.batch_size == DEFAULTS["batch_size"] and args.device == "cpu"
    for key in runconfig.keys("model"):
        assert hasattr(args, key.name)


def test_a_norms_options_are_keys_unit_options_and_flags():
    seen = []

    def unit(c_in, c_out, k, s, p, *, rng, dtype, opts):
        seen.append(opts.test_gain)
        return [nn.Conv2d(c_in, c_out, k, s, p, rng=rng, init=opts.init, dtype=dtype)]

    norms.register_norm(norms.Norm(
        "test_opt", "with an option", "k", conv_unit=unit,
        activation=norms.get_norm("none").activation, head=norms.get_norm("none").head,
        options=(Key("test_gain", 2.0, real(gt=0), "a gain of this test"),)), replace=True)
    try:
        assert DEFAULTS["test_gain"] == 2.0 and "test_gain" not in runconfig.RESUME_ALLOWED
        assert norms.UnitOptions().test_gain == 2.0
        assert runconfig.unit_options(make_config({"test_gain": 3}))["test_gain"] == 3
        build_model("cifar10_nv", "test_opt", in_channels=1, num_classes=10, width=1 / 16,
                    opts=runconfig.unit_options(runconfig.validate(make_config(
                        {"test_gain": 3}))))
        assert seen and set(seen) == {3.0}
        assert parse("train", "--norm", "test_opt", "--test-gain", "0.5").test_gain == 0.5
        with pytest.raises(ValueError, match="test_gain must be a finite number > 0"):
            norms.UnitOptions(test_gain=-1)
        # registering it again (replace=True) keeps one row; another owner may not take it
        norms.register_norm(norms.get_norm("test_opt"), replace=True)
        with pytest.raises(ValueError, match="already exists"):
            runconfig.add_key(Key("test_gain", 1.0, real(gt=0)), owner="someone else",
                              replace=True)
    finally:
        norms.NORM_REGISTRY.pop("test_opt", None)
        runconfig.remove_key("test_gain")


# -- logs written by earlier versions -----------------------------------------------------

def _write_log(path, config):
    with h5py.File(path, "w") as f:
        f.attrs["config"] = json.dumps(config)
        f.attrs["status"] = "completed"
        f.attrs["diverged_at"] = -1
        f.attrs["diverged_reason"] = ""
        g = f.create_group("iter")
        g.create_dataset("loss", data=np.array([2.0, 1.0]))


def test_a_log_from_before_the_norm_registry_reads_as_what_it_ran(tmp_path):
    # no init, wn_g_init, normprop_scale, residual_scale, interrupted_reason, config_changes
    old = {k: v for k, v in DEFAULTS.items()
           if k not in ("init", "wn_g_init", "normprop_scale", "residual_scale", "dropout",
                        "clean_eval_size", "device", "dtype", "rank_timeout")
           and k in runconfig.BUILTIN}
    _write_log(tmp_path / "log.h5", dict(old, model="resnet50", norm="normprop"))
    run = read_log(tmp_path)
    cfg = run["config"]
    assert (cfg["init"], cfg["wn_g_init"], cfg["normprop_scale"]) == ("glorot", "norm", 1.0)
    assert cfg["residual_scale"] == pytest.approx(1 / math.sqrt(2))
    assert run["interrupted_reason"] == "" and run["config_changes"] == []
    assert list(run["iter"]["loss"]) == [2.0, 1.0]
    # and as a complete, valid configuration
    assert runconfig.validate(make_config(base=cfg))["init"] == "glorot"


def test_a_log_with_init_xavier_meant_glorot(tmp_path):
    _write_log(tmp_path / "log.h5", {"model": "cifar10_nv", "norm": "wn", "init": "xavier"})
    assert read_log(tmp_path / "log.h5")["config"]["init"] == "glorot"


@pytest.mark.parametrize("log", ["plots/logs/ablation_init/resnet_normprop_s1.21.h5",
                                 "plots/logs/short/fig3_resnet50/trelu.h5"])
def test_the_committed_log_formats_read(log):
    # the first has no device, dtype, rank_timeout, dropout, clean_eval_size; the second
    # no dropout, clean_eval_size
    run = read_log(ROOT / log)
    assert run["status"] in ("completed", "diverged", "interrupted")
    cfg = runconfig.validate(make_config(base=run["config"]))
    assert set(cfg) == set(DEFAULTS)


def test_bn_eps_is_one_row_and_reaches_every_bn_layer():
    assert DEFAULTS["bn_eps"] == 1e-5 and parse("train", "--bn-eps", "1e-3").bn_eps == 1e-3
    for name, kw in (("cifar10_nv", {}), ("deep_linear", dict(in_features=8, depth=3))):
        model = build_model(name, "bn", in_channels=1, num_classes=10, width=1 / 16,
                            opts=runconfig.unit_options(make_config({"bn_eps": 1e-3})), **kw)
        eps = [layer.eps for _, layer in model.named_layers() if isinstance(layer, nn.BatchNorm)]
        assert eps and set(eps) == {1e-3}

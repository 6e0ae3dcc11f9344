"""Progress output: a bar on a terminal, a few plain lines where output is a file."""
import io

import numpy as np

from tinynorm.progress import EpochProgress
from tinynorm.train import Trainer


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_plain_lines_at_most_every_interval():
    quiet = io.StringIO()
    bar = EpochProgress(400, desc="epoch 1/2", every_s=3600, stream=quiet)
    for _ in range(400):
        bar.update("loss 1.0")
    bar.close()
    assert not bar.is_bar and quiet.getvalue() == ""          # 400 updates, no redraws
    every = io.StringIO()
    bar = EpochProgress(3, initial=1, desc="epoch 2/2", every_s=0, stream=every)
    bar.update("loss 0.5")
    bar.update("loss 0.4")
    assert every.getvalue().splitlines() == ["epoch 2/2  batch 2/3  loss 0.5",
                                             "epoch 2/2  batch 3/3  loss 0.4"]


def test_a_terminal_gets_a_bar():
    term = FakeTerminal()
    bar = EpochProgress(5, desc="epoch 1/1", stream=term)
    assert bar.is_bar
    for _ in range(5):
        bar.update("loss 1.0")
    bar.close()
    assert "epoch 1/1" in term.getvalue() and "\r" in term.getvalue()


def test_a_run_with_progress_into_a_file_writes_one_line_per_epoch(synthetic_dataset, tmp_path,
                                                                   capsys):
    from tinynorm.train import _Data, make_config
    cfg = make_config(dict(model="cifar10_nv", norm="bn", width=1 / 16, batch_size=16, epochs=2,
                           lr=0.01, progress=True, out=str(tmp_path / "run")))
    data = _Data(cfg, dataset=synthetic_dataset(n_train=160, n_test=32))
    assert Trainer(cfg, data).run() == "completed"
    out, err = capsys.readouterr()          # capsys: neither stream is a terminal
    assert [line.split()[:2] for line in out.splitlines()] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert "\r" not in err and err.count("\n") <= 2
    assert np.isfinite(float(out.split("train loss ")[1].split()[0]))

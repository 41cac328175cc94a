"""Training output: one line per epoch whatever the output is, tqdm bars only when it is a terminal."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.classification import train_classifier
from finetune.progress import epoch_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train(tmp_path, progress: bool = True) -> None:
    """Two epochs of 3 steps: a linear classifier of random points."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    model = torch.nn.Linear(4, 3)
    train_classifier(
        model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=24), tmp_path, 2, progress=progress
    )


EPOCH_LINE = re.compile(r"epoch (\d)/2  step (\d)  loss \S+  ce \S+  val_acc1 \S+  \d+\.\ds")


@pytest.mark.parametrize("progress", [True, False])
def test_written_to_a_file_training_prints_one_line_per_epoch(tmp_path, capsys, progress):
    train(tmp_path, progress)
    out, err = capsys.readouterr()
    assert [EPOCH_LINE.fullmatch(line).groups() for line in out.splitlines()] == [("1", "3"), ("2", "6")]
    assert err == ""  # no bar: nothing that a carriage return redraws


def test_on_a_terminal_training_draws_bars_and_keeps_the_lines(tmp_path, monkeypatch):
    stdout, stderr = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    train(tmp_path)
    assert "epoch 1/2:" in stderr.getvalue() and "\r" in stderr.getvalue()  # tqdm's bar, redrawn in place
    assert [line[:9] for line in stdout.getvalue().splitlines()] == ["epoch 1/2", "epoch 2/2"]

    monkeypatch.setattr(sys, "stderr", Terminal())
    train(tmp_path / "quiet", progress=False)  # --no-progress: the lines alone
    assert sys.stderr.getvalue() == ""


def test_the_epoch_line_shows_the_metrics_that_matter():
    train = {"ce": 1.1, "acc1": 50.0, "macs": 9.9e6, "target_macs": 1e7, "loss": 1.2345, "lambda": 0.5, "gate.0.msa": 1}
    val = {"step": 120, "epoch": 2, "val_acc1": 71.25, "val_macs": 9.8e6, "val_loss": 0.9}
    assert epoch_line(train, val, epochs=10, seconds=12.34) == (
        "epoch 3/10  step 120  loss 1.234  ce 1.1  macs/target 0.980  lambda 0.5  val_acc1 71.25  12.3s"
    )

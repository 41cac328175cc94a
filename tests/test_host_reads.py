"""The hot loops do not wait for the device: host reads of tensors, counted from outside, per step and log interval.

On a GPU every read of a tensor's value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:` ...) waits for all
the kernels queued before it. Counted here on the CPU by patching those methods: the search step may read once (the
mixers its gate draw picked, for all blocks together), the fine-tune step never, and every log interval once more.
Reads made while the data loader produces a batch are the loader's, not the loop's, and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

from finetune.engine import Engine
from spvit_search.finetuning import FinetuneConfig, run_finetune
from spvit_search.search import SearchConfig, run_search

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
TINY = {"model": "test_vit", "img_size": 32, "model_kwargs": {"patch_size": 4}}


class HostReads:
    """Counts host reads made inside the engine's training epochs and evaluations, outside the loader."""

    def __init__(self) -> None:
        self.in_loop = 0  # > 0 inside Engine._train_epoch or Engine._evaluate
        self.in_loader = 0
        self.train = 0
        self.evaluate = 0
        self.phase = "train"

    def counting(self) -> bool:
        return self.in_loop > 0 and self.in_loader == 0


@contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
    reads = HostReads()

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if reads.counting():
                setattr(reads, reads.phase, getattr(reads, reads.phase) + 1)
            return original(self, *args, **kwargs)

        return read

    def inside(method: str, phase: str):
        original = getattr(Engine, method)

        def run(self, *args, **kwargs):
            reads.in_loop += 1
            previous, reads.phase = reads.phase, phase
            try:
                return original(self, *args, **kwargs)
            finally:
                reads.in_loop -= 1
                reads.phase = previous

        return run

    def in_loader(original):
        def run(self, *args, **kwargs):
            reads.in_loader += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                reads.in_loader -= 1

        return run

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    monkeypatch.setattr(Engine, "_train_epoch", inside("_train_epoch", "train"))
    monkeypatch.setattr(Engine, "_evaluate", inside("_evaluate", "evaluate"))
    monkeypatch.setattr(DataLoader, "__iter__", in_loader(DataLoader.__iter__))  # draws the epoch's worker seed
    monkeypatch.setattr(_BaseDataLoaderIter, "__next__", in_loader(_BaseDataLoaderIter.__next__))
    yield reads


def test_the_counter_sees_a_read_in_the_loop(monkeypatch):
    with count_host_reads(monkeypatch) as reads:
        reads.in_loop = 1
        assert float(torch.ones(())) == 1.0 and torch.ones(2).tolist() == [1.0, 1.0]
    assert reads.train == 2


@pytest.mark.parametrize("log_every", [1, 5, 50])
def test_a_search_epoch_reads_once_per_step_and_once_per_log_interval(
    dense_checkpoint, tmp_path, monkeypatch, log_every
):
    config = SearchConfig(
        **TINY, checkpoint=str(dense_checkpoint), out=str(tmp_path / "run"), target="0.6x", epochs=1,
        log_every=log_every, progress=False, device="cpu", num_workers=0,
    )  # fmt: skip
    with count_host_reads(monkeypatch) as reads:
        summary = run_search(config)
    steps = summary["steps"]  # 1,438 digits / 64 per batch: 23
    intervals = math.ceil(steps / log_every)
    # One read per step (the gate draw's mixers), one per log interval (the metrics): without the single read per
    # step, each block would read its draw on its own, and each metric would be read every step.
    assert reads.train <= steps + intervals
    # The acceptance figure: a whole epoch (steps and validation) at the default interval, far below the ~3,660
    # reads the loop made when every metric and every block's draw was read at once.
    assert reads.train + reads.evaluate <= 400


def test_a_finetune_epoch_reads_once_per_log_interval(folder_subnet, image_folder, tmp_path, monkeypatch):
    config = FinetuneConfig(
        subnet=str(folder_subnet), data=str(image_folder), out=str(tmp_path / "run"), teacher_model=str(folder_subnet),
        distillation="soft", epochs=1, batch_size=4, log_every=3, progress=False, device="cpu", num_workers=0,
    )  # fmt: skip
    with count_host_reads(monkeypatch) as reads:
        summary = run_finetune(config)
    intervals = math.ceil(summary["steps"] / 3)  # 32 images / 4 per batch: 8 steps, 3 intervals
    assert reads.train <= intervals

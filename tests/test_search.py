"""`spvit search`: lands on the budget, resumes bit-identically after a kill, and runs under DDP."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from helpers import ForkedSpvit, elastic_torchrun, forked_ranks, run_killing_a_rank
from safetensors.torch import load_file

from lookup_tables import LookupTable
from spvit_search.cli import main
from supernets import Architecture

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]


def search_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["search", *TINY, "--checkpoint", str(checkpoint), "--out", str(out), *extra]


def test_search_lands_on_the_budget(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--target", "0.6x", "--epochs", "4", "--gate-lr", "0.1", "--patience", "1"]
    assert main(search_args(dense_checkpoint, out, *args)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    lut = LookupTable.load(out / "lut.csv")
    target = 0.6 * lut.dense_flops()
    # The gates alone reach the target within ±2%; the projection then meets it from below.
    assert abs(summary["macs_before_projection"] / target - 1) <= 0.02
    arch = Architecture.load(out / "arch.json")
    assert lut.flops(arch) == summary["macs"] <= target
    assert lut.flops(arch) >= 0.99 * target
    assert f"val top-1 {summary['val_acc1']:.2f}%" in printed
    epochs = summary["epochs"]
    assert sorted(p.name for p in out.glob("arch_epoch*.json")) == sorted(
        f"arch_epoch{i}.json" for i in range(1, epochs + 1)
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "ce" in r]
    assert {"ce", "complexity", "macs", "target_macs", "lambda", "acc1", "mlp_kept"} <= set(steps[0])
    assert sum("val_acc1" in r for r in records) == epochs


def _gate_logits(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / "supernet.safetensors")).items() if "gates.logits" in k}


def test_killed_search_resumes_bit_identically(dense_checkpoint, tmp_path):
    args = ["--target", "0.5x", "--epochs", "2", "--gate-lr", "0.05", "--checkpoint-every", "5", "--patience", "9"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(search_args(dense_checkpoint, straight, *args)) == 0

    process = ForkedSpvit(search_args(dense_checkpoint, killed, *args))
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert json.loads((killed / ".lock").read_text())["pid"] == process.pid  # stale: its holder was killed

    assert main(search_args(dense_checkpoint, killed, *args, "--resume", "auto")) == 0  # takes the stale lock over
    assert not (killed / ".lock").exists()
    a, b = _gate_logits(straight), _gate_logits(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "arch.json").read_text() == (killed / "arch.json").read_text()
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no step logged twice across the kill


def test_a_second_writer_of_a_live_run_is_refused_and_the_first_finishes(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--target", "0.8x", "--epochs", "1", "--resume", "auto"]  # auto: nothing to resume, so a fresh run
    first = ForkedSpvit(search_args(dense_checkpoint, out, *args))
    deadline = time.time() + 120
    while not (out / ".lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert main(search_args(dense_checkpoint, out, *args)) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(rf"spvit: error: {re.escape(str(out))} is in use by pid {first.pid} on \S+; .*\n", error)
    assert first.wait(timeout=300) == 0, first.stderr()[-2000:]
    assert (out / "summary.json").is_file() and not (out / ".lock").exists()


def test_resume_refuses_other_settings_and_finished_runs(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--target", "0.8x", "--epochs", "1"]
    assert main(search_args(dense_checkpoint, out, *args)) == 0
    assert main(search_args(dense_checkpoint, out, *args)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(search_args(dense_checkpoint, out, "--target", "0.7x", "--epochs", "1", "--resume")) == 2
    assert "target differ" in capsys.readouterr().err
    assert main(search_args(dense_checkpoint, out, *args, "--resume")) == 2
    assert "finished run" in capsys.readouterr().err


# A 2-process search; under the elastic agent, `--resume auto` starts it, or continues it after a restart.
DDP_SEARCH = ["--target", "0.7x", "--epochs", "1", "--batch-size", "64", "--log-every", "1", "--checkpoint-every", "5"]


def test_ddp_search_writes_one_set_of_outputs_and_survives_a_killed_rank(dense_checkpoint, tmp_path, capfd):
    """Two gloo processes write one set of outputs; with one of them SIGKILLed mid-epoch, torchrun restarts the
    group, which resumes from the last checkpoint and ends with the same architecture and weights as an
    uninterrupted pair of ranks."""
    out, killed = tmp_path / "ddp", tmp_path / "killed"
    assert forked_ranks(search_args(dense_checkpoint, out, *DDP_SEARCH)) == [0, 0]
    assert capfd.readouterr().out.count("searched test_vit") == 1  # only rank 0 reports
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["arch.json", "arch_epoch1.json", "checkpoint.safetensors", "config.json", "lut.csv", "metrics.jsonl",
         "summary.json", "supernet.safetensors"]
    )  # fmt: skip
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "ce" in r]) == 12  # 1,438 images / 2 ranks / 64 per batch, once

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = elastic_torchrun(*search_args(dense_checkpoint, killed, *DDP_SEARCH, "--resume", "auto"))
    run_killing_a_rank(command, killed / "checkpoint.safetensors", env)
    resumed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert resumed == steps  # every step's metrics, as if nothing had happened
    assert (killed / "arch.json").read_text() == (out / "arch.json").read_text()
    a, b = load_file(str(out / "supernet.safetensors")), load_file(str(killed / "supernet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

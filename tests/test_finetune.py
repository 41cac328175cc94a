"""`spvit finetune` and `spvit eval`: distillation runs, best/last subnets, bit-identical resume, DDP."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import ForkedSpvit, elastic_torchrun, forked_ranks, run_killing_a_rank
from safetensors.torch import load_file

from finetune.classification import evaluate_classifier
from lookup_tables import LookupTable
from spvit_search.cli import main
from spvit_search.data import build_dataset, build_loader
from spvit_search.export import export_subnet, load_subnet, read_subnet_source, save_subnet
from supernets import build_supernet
from supernets.registry import create_source_model

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]


def finetune_args(subnet: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--subnet", str(subnet), "--out", str(out), "--no-progress", *extra]


def test_export_records_the_dense_source(subnet_dir, dense_checkpoint):
    source = read_subnet_source(subnet_dir)
    assert source == {
        "model": "test_vit", "pretrained": False, "checkpoint": str(dense_checkpoint.resolve()), "img_size": 32,
        "num_classes": 10, "model_kwargs": {"patch_size": 4},
    }  # fmt: skip


def test_finetune_writes_best_last_and_a_true_summary(subnet_dir, search_run, dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(finetune_args(subnet_dir, out, "--epochs", "2")) == 0
    assert "val top-1" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    val = build_loader(build_dataset("digits", "val", 32), 256, train=False)
    last, best = load_subnet(out / "last"), load_subnet(out / "best")
    assert evaluate_classifier(last, val)["acc1"] == pytest.approx(summary["val_acc1"])
    assert evaluate_classifier(best, val)["acc1"] == pytest.approx(summary["best_val_acc1"])
    assert summary["best_val_acc1"] >= summary["val_acc1"]
    dense = create_source_model("test_vit", checkpoint_path=dense_checkpoint, img_size=32, num_classes=10, patch_size=4)
    assert summary["dense_val_acc1"] == pytest.approx(evaluate_classifier(dense.eval(), val)["acc1"])
    # MACs are fvcore's count of the subnet module; the search's lookup table prices the same architecture.
    lut = LookupTable.load(search_run / "lut.csv")
    assert summary["macs"] == pytest.approx(lut.flops(last.arch), rel=1e-3)
    assert summary["dense_macs"] == pytest.approx(lut.dense_flops(), rel=1e-3)
    assert summary["params"] == sum(p.numel() for p in last.parameters())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "loss", "acc1", "lr_weights"} <= set(records[0])
    assert [r["epoch"] for r in records if "val_acc1" in r] == [0, 1]
    assert (out / "arch.json").read_text() == (subnet_dir / "arch.json").read_text()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_killed_finetune_resumes_bit_identically(folder_subnet, image_folder, tmp_path):
    # Hard distillation from a teacher (the subnet itself): the teacher's state must not break the resume either.
    args = ["--data", str(image_folder), "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "3"]
    args += ["--distillation", "hard", "--teacher-model", str(folder_subnet)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(finetune_args(folder_subnet, straight, *args)) == 0

    process = ForkedSpvit(finetune_args(folder_subnet, killed, *args))
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    assert main(finetune_args(folder_subnet, killed, *args, "--resume")) == 0
    for name in ("last", "best"):
        a, b = _weights(straight / name), _weights(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_ema_and_bf16_train_and_evaluate_the_average(folder_subnet, image_folder, tmp_path):
    out = tmp_path / "ema"
    args = ["--data", str(image_folder), "--batch-size", "4", "--epochs", "1", "--distillation", "none"]
    assert main(finetune_args(folder_subnet, out, *args, "--model-ema", "--model-ema-decay", "0.9", "--bf16")) == 0
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val_acc1", "val_raw_acc1"} <= set(record)
    val = build_loader(build_dataset(str(image_folder), "val", 32), 256, train=False)
    assert evaluate_classifier(load_subnet(out / "last"), val)["acc1"] == pytest.approx(record["val_acc1"])


def test_teacher_and_init_choices(subnet_dir, dense_checkpoint, tmp_path, capsys):
    # A subnet directory as the teacher: itself, so soft KD starts at zero.
    out = tmp_path / "self"
    assert main(finetune_args(subnet_dir, out, "--epochs", "1", "--teacher-model", str(subnet_dir))) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kd"] < 0.05  # dropout-free subnet: only augmentation noise separates student and teacher
    # --init dense: the subnet's architecture with the dense model's weights.
    out = tmp_path / "dense_init"
    assert main(finetune_args(subnet_dir, out, "--epochs", "1", "--init", "dense", "--lr", "0")) == 0
    arch = load_subnet(subnet_dir).arch
    net = build_supernet("test_vit", checkpoint_path=dense_checkpoint, img_size=32, num_classes=10, patch_size=4)
    expected = export_subnet(net, arch).state_dict()
    got = _weights(out / "last")
    changing = ("running_mean", "running_var", "num_batches_tracked")  # BN statistics move even at lr 0
    assert all(torch.equal(got[k], v) for k, v in expected.items() if not k.endswith(changing))
    capsys.readouterr()
    # A subnet that does not record its dense source needs an explicit teacher.
    bare = tmp_path / "bare"
    save_subnet(load_subnet(subnet_dir), bare)
    assert main(finetune_args(bare, tmp_path / "x", "--epochs", "1")) == 2
    assert "pass --teacher-model" in capsys.readouterr().err  # or --distillation none: see test_faults.py


def test_finetune_refusals(subnet_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(finetune_args(subnet_dir, out, "--epochs", "1", "--distillation", "none")) == 0
    assert main(finetune_args(subnet_dir, out, "--epochs", "1", "--distillation", "none")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(finetune_args(subnet_dir, out, "--epochs", "1", "--resume")) == 2
    assert "distillation differ" in capsys.readouterr().err
    assert main(finetune_args(tmp_path / "nowhere", tmp_path / "z")) == 2
    assert "not a subnet directory" in capsys.readouterr().err
    assert main(finetune_args(subnet_dir, tmp_path / "w", "--distillation-alpha", "2")) == 2
    assert "alpha" in capsys.readouterr().err


def test_eval_prints_accuracy_cost_and_latency(subnet_dir, dense_checkpoint, capsys):
    assert main(["eval", "--subnet", str(subnet_dir)]) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in ("top-1", "top-5", "MMACs", "M params", "ms per batch"))
    args = ["eval", "--model", "test_vit", "--checkpoint", str(dense_checkpoint), "--img-size", "32"]
    assert main([*args, "--model-kwargs", "patch_size=4"]) == 0
    assert "test_vit: top-1" in capsys.readouterr().out


def test_ddp_finetune_writes_one_set_of_outputs_and_survives_a_killed_rank(subnet_dir, tmp_path, capfd):
    """Two gloo processes write one set of outputs; with one of them SIGKILLed mid-epoch, torchrun restarts the
    group, which resumes from the last checkpoint and ends with the same weights and metrics as an uninterrupted
    pair of ranks."""
    out, killed = tmp_path / "ddp", tmp_path / "killed"
    extra = ["--epochs", "1", "--batch-size", "64", "--log-every", "1", "--checkpoint-every", "5"]
    assert forked_ranks(finetune_args(subnet_dir, out, *extra)) == [0, 0]
    assert capfd.readouterr().out.count("fine-tuned test_vit") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["arch.json", "best", "checkpoint.safetensors", "config.json", "last", "metrics.jsonl", "summary.json"]
    )
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "ce" in r]) == 12  # 1,438 images / 2 ranks / 64 per batch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the forked ranks: the same reductions, bit for bit
    command = elastic_torchrun(*finetune_args(subnet_dir, killed, *extra, "--resume", "auto"))
    run_killing_a_rank(command, killed / "checkpoint.safetensors", env)
    assert [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()] == steps
    for name in ("best", "last"):
        a, b = load_file(str(out / name / "model.safetensors")), load_file(str(killed / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

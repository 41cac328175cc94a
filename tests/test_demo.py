"""`spvit demo`: every step runs and writes its run directory; the dense model is cached across runs."""

from __future__ import annotations

import json

import torch

from spvit_search.data import build_dataset
from spvit_search.demo import DemoConfig, run_demo, train_dense_model
from spvit_search.export import load_subnet


def test_demo_runs_every_step_and_reuses_the_dense_model(tmp_path, capsys):
    config = DemoConfig(
        out=str(tmp_path / "demo"), dense_epochs=1, search_epochs=1, finetune_epochs=1, target="0.7x", progress=False
    )
    results = run_demo(config)
    printed = capsys.readouterr().out
    assert all(f"[{i}/6]" in printed for i in range(1, 7))
    assert "train the dense test_vit" in printed
    out = tmp_path / "demo"
    for name in ("dense", "search", "subnet", "finetune", "report"):
        assert (out / name).is_dir(), name
    assert json.loads((out / "results.json").read_text()) == results
    subnet = load_subnet(out / "finetune" / "last")
    assert results["subnet"]["params"] == sum(p.numel() for p in subnet.parameters())
    assert results["subnet"]["macs"] <= 0.7 * results["dense"]["macs"] * 1.001
    assert f"{results['subnet']['acc1']:6.2f}%" in printed

    # A second run reuses the dense model while its settings stay the same.
    train = build_dataset(config.data, "train", config.img_size)
    val = build_dataset(config.data, "val", config.img_size, augment=False)
    weights = train_dense_model(config, out / "dense", train, val, classes=10, device=torch.device("cpu"))
    assert "reusing" in capsys.readouterr().out
    assert weights == out / "dense" / "model.safetensors"

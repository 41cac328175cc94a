"""`spvit demo`: every step runs and writes its run directory; the dense model is cached across runs."""

from __future__ import annotations

import json

from spvit_search.demo import DemoConfig, run_demo
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

    run_demo(config)
    assert "reusing" in capsys.readouterr().out

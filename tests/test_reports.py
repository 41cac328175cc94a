"""`spvit report`: files, valid PNGs, tables that agree with the lookup table, partial runs warned about."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookup_tables import LookupTable, build_lookup_table
from reports import write_report
from spvit_search.cli import main
from supernets import Architecture, BlockChoice, build_supernet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finetune_run(subnet_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune") / "run"
    args = ["finetune", "--subnet", str(subnet_dir), "--out", str(out), "--no-progress", "--epochs", "1"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def optuna_run(dense_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("optuna") / "study"
    args = ["search", "--strategy", "optuna", "--model", "test_vit", "--img-size", "32"]
    args += ["--model-kwargs", "patch_size=4", "--no-progress", "--checkpoint", str(dense_checkpoint)]
    assert main([*args, "--out", str(out), "--target", "0.6x", "--trials", "12", "--eval-batches", "1"]) == 0
    return out


def check_images(report) -> None:
    assert report.images
    for path in report.images:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert min(image.size) > 100, (path, image.size)


def check_against_lookup_table(frame, arch: Architecture, lut: LookupTable) -> None:
    """Totals are the table's prices of `arch`; each block's saving is what the table charges for making that
    block alone dense again."""
    blocks = frame.drop(index=["fixed", "total"])
    assert frame.loc["total", "macs"] == lut.flops(arch)
    assert frame.loc["total", "params"] == lut.params(arch)
    assert frame.loc["total", "dense_macs"] == lut.dense_flops()
    dense_block = BlockChoice("msa", tuple(range(int(blocks.mlp_total.iloc[0]))))
    for i, block in enumerate(arch.blocks):
        row = blocks.loc[str(i)]
        assert (row.mixer, row.mlp_kept) == (block.mixer, len(block.mlp_kept))
        densified = dataclasses.replace(arch, blocks=arch.blocks[:i] + (dense_block,) + arch.blocks[i + 1 :])
        assert row.dense_macs - row.macs == lut.flops(densified) - lut.flops(arch)
        assert row.dense_params - row.params == lut.params(densified) - lut.params(arch)


def test_search_and_finetune_report(search_run, finetune_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(search_run), str(finetune_run), "--out", str(out)]) == 0
    assert "report on 1 run(s)" in capsys.readouterr().out
    for name in ("index.html", "report.md"):
        assert (out / name).stat().st_size > 0
    report = write_report([search_run, finetune_run], tmp_path / "again")
    assert len(report.runs) == 1 and report.runs[0].finetune is not None  # linked by architecture
    check_images(report)
    names = {p.name for p in report.images}
    for plot in ("block_map", "block_macs", "mlp_ratio", "gates", "macs", "search_curves", "finetune_curves"):
        assert any(n.endswith(f"_{plot}.png") for n in names), plot

    arch = Architecture.load(search_run / "arch.json")
    lut = LookupTable.load(search_run / "lut.csv")
    (caption,) = [c for c in report.tables if c.endswith("architecture")]
    check_against_lookup_table(report.tables[caption], arch, lut)
    summary = report.tables[next(c for c in report.tables if c.endswith("summary"))]
    assert summary.loc["MACs", "value"] == f"{lut.flops(arch):,}"
    finetuned = json.loads((finetune_run / "summary.json").read_text())["val_acc1"]
    assert summary.loc["val top-1 fine-tuned (%)", "value"] == f"{finetuned:.2f}"

    # index.html stands alone: every image is embedded, none is linked.
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(report.images)
    assert not re.search(r'src="(?!data:)', page)
    markdown = (out / "report.md").read_text()
    assert all(f"]({p.name})" in markdown for p in report.images)
    assert f"| {lut.flops(arch):,} |" in markdown


def test_optuna_report_and_comparison(search_run, optuna_run, tmp_path):
    report = write_report([search_run, optuna_run], tmp_path / "report")
    assert len(report.runs) == 2
    check_images(report)
    names = {p.name for p in report.images}
    assert any(n.endswith("_trials.png") for n in names)
    assert "comparison_accuracy_vs_macs.png" in names
    comparison = report.tables["comparison"]
    for run in (search_run, optuna_run):
        summary = json.loads((run / "summary.json").read_text())
        row = comparison.loc[next(label for label in comparison.index if label.endswith(run.name))]
        lut = LookupTable.load(run / "lut.csv")
        assert row.macs == summary["macs"] == lut.flops(Architecture.load(run / "arch.json"))
    (caption,) = [c for c in report.tables if "study" in c and c.endswith("architecture")]
    check_against_lookup_table(
        report.tables[caption], Architecture.load(optuna_run / "arch.json"), LookupTable.load(optuna_run / "lut.csv")
    )


def test_partial_and_malformed_runs_are_reported_with_warnings(search_run, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(search_run, partial)
    (partial / "arch.json").unlink()
    (partial / "summary.json").unlink()
    with (partial / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 0.')  # a line cut short by a crash
    (partial / "lut.csv").write_text("not a lookup table\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (broken / "arch.json").write_text(json.dumps({"model": "x", "blocks": "none"}))

    out = tmp_path / "report"
    assert main(["report", str(partial), str(broken), str(tmp_path / "missing"), "--out", str(out)]) == 0
    errors = capsys.readouterr().err
    for phrase in (
        "summary.json is missing",
        "showing arch_epoch2.json",
        "skipped 1 malformed line",
        "lut.csv is not a valid lookup table",
        "config.json cannot be read",
        "arch.json is not a valid architecture",
        "missing does not exist",
    ):
        assert phrase in errors, phrase
    assert "Traceback" not in errors
    page = (out / "index.html").read_text()
    assert "Warnings" in page and "skipped 1 malformed line" in page
    assert "_block_map.png" in (out / "report.md").read_text()  # what exists is still drawn


def test_report_refusals(search_run, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["report", str(search_run), "--out", str(occupied)]) == 2
    assert (occupied / "notes.txt").read_text() == "mine"
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no run directory to report on" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

    # A report directory is replaced whole.
    out = tmp_path / "report"
    assert main(["report", str(search_run), "--out", str(out)]) == 0
    (out / "stale.png").write_bytes(b"")
    assert main(["report", str(search_run), "--out", str(out)]) == 0
    assert not (out / "stale.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_t2t_report_prices_a_shallower_narrower_subnet(tmp_path):
    """A table priced at several widths: the pruned columns at the architecture's width, the dense ones at the
    full width, and the blocks past its depth shown as removed."""
    net = build_supernet("t2t_vit_7", img_size=32, num_classes=10, embed_dim=64, depth=3)
    lut = build_lookup_table(net)
    run = tmp_path / "run"
    run.mkdir()
    lut.save(run / "lut.csv")
    heads = 2
    blocks = (BlockChoice("bconv3", tuple(range(0, 128, 3))), BlockChoice("msa", tuple(range(40))))
    arch = Architecture(net.name, 32, 10, blocks, {"embed_dim": heads * net.head_dim, "num_heads": heads})
    arch.save(run / "arch.json")
    (run / "config.json").write_text(json.dumps({"model": net.name, "target": "0.4x"}))

    report = write_report([run], tmp_path / "report")
    assert not [w for w in report.warnings if "lut.csv" in w or "does not fit" in w], report.warnings
    frame = report.tables["run: architecture"]
    assert frame.loc["2", "mixer"] == "removed" and frame.loc["2", "macs"] == 0
    assert frame.loc["total", "macs"] == lut.flops(arch)
    assert frame.loc["total", "params"] == lut.params(arch)
    assert frame.loc["total", "dense_macs"] == lut.dense_flops()
    assert frame.loc["total", "dense_params"] == lut.params(net.dense_architecture())


def test_sret_report_prices_the_architecture_group_splits(tmp_path):
    """The msa of an architecture with group splits other than the model's is priced at its own splits."""
    kwargs = dict(base_dim=8, heads=[1, 2, 4], depth=[4, 2, 2], recursive_num=[2, 1, 1])
    net = build_supernet("sret_t", img_size=64, num_classes=10, groups=[[4, 2], [2, 1], [1, 1]], **kwargs)
    lut = build_lookup_table(net)
    run = tmp_path / "run"
    run.mkdir()
    lut.save(run / "lut.csv")
    dense = net.dense_architecture()
    arch = dense.with_extras(groups=((16, 1), (1, 4), (2, 2)))
    arch.save(run / "arch.json")
    (run / "config.json").write_text(json.dumps({"model": net.name, "target": "0.9x"}))

    report = write_report([run], tmp_path / "report")
    assert not [w for w in report.warnings if "lut.csv" in w or "does not fit" in w], report.warnings
    frame = report.tables["run: architecture"]
    assert lut.flops(arch) != lut.flops(dense)
    assert frame.loc["total", "macs"] == lut.flops(arch)
    assert frame.loc["total", "dense_macs"] == lut.flops(dense) == lut.dense_flops()
    assert frame.loc["total", "params"] == lut.params(arch)


@pytest.mark.parametrize("family", ["sret", "t2t"])
def test_reports_read_and_price_architectures_without_torch(family):
    """Reports import the torch-free contract and table format, family fields included, instead of copies; what
    they price an old table's architecture at is what `LookupTable` prices it at."""
    frozen = Path(__file__).parent / "data" / "frozen_v1"
    arch_path, lut_path = frozen / f"subnet_{family}" / "arch.json", frozen / f"lut_{family}.csv"
    code = (
        "import sys; from pathlib import Path; from reports.run_files import read_architecture; "
        "from reports.costs import architecture_table, read_cost_table; warnings = []; "
        f"arch = read_architecture(Path({str(arch_path)!r}), warnings); "
        f"table = read_cost_table(Path({str(lut_path)!r}), warnings); "
        "frame = architecture_table(arch, table); assert not warnings, warnings; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "print(frame.loc['total', 'macs'], frame.loc['total', 'params'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, capture_output=True, text=True
    )
    lut, arch = LookupTable.load(lut_path), Architecture.load(arch_path)
    assert arch.extras  # a family field (groups, embed_dim) that prices the architecture
    assert result.stdout.split() == [str(lut.flops(arch)), str(lut.params(arch))]
    assert lut.flops(arch) != lut.dense_flops()

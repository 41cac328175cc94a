"""Bad input: every mistake ends in one line, `spvit: error: ...`, exit code 2, and no traceback (`--debug` shows it).

One fixture makes the files the cases need: a lookup table, a finished search run (with its lut), copies of the run
with a corrupt or foreign checkpoint, architectures, checkpoints and datasets that are wrong in one way each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.checkpoint import load_checkpoint, save_checkpoint
from spvit_search.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_IO_ERROR, build_parser, main
from spvit_search.export import load_subnet
from supernets import Architecture

MODEL = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4"]
SEARCH = ["search", *MODEL, "--no-progress", "--batch-size", "4"]


def search(f: SimpleNamespace, *extra: str, out: Path | None = None, data: Path | str | None = None) -> list[str]:
    return [*SEARCH, "--data", str(data or f.images), "--out", str(out or f.tmp / "new"), *extra]


def run_args(f: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    """The finished run's own command line, in another run directory."""
    return search(f, "--target", "0.6x", "--epochs", "1", "--lut", str(f.lut), *extra, out=out)


def _resumable_copy(run: Path, to: Path) -> Path:
    """A copy of a finished run as a killed one looks: no summary.json."""
    shutil.copytree(run, to)
    (to / "summary.json").unlink()
    return to


def _write_arch(path: Path, **changes) -> Path:
    data = json.loads((path.parent / "run" / "arch.json").read_text()) | changes
    path.write_text(json.dumps(data))
    return path


def _write_lut(source: Path, path: Path, **changes) -> Path:
    header, _, body = source.read_text().partition("\n")
    meta = json.loads(header.removeprefix("# ")) | changes
    path.write_text(f"# {json.dumps(meta)}\n{body}")
    return path


@pytest.fixture(scope="module")
def f(tmp_path_factory, image_folder, folder_subnet) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("bad_input")
    lut = tmp / "lut.csv"
    assert main(["lut", *MODEL, "--num-classes", "2", "--out", str(lut)]) == 0
    files = SimpleNamespace(tmp=tmp, images=image_folder, lut=lut, run=tmp / "run", subnet=folder_subnet)
    assert main(run_args(files, files.run)) == 0

    # Checkpoints (timm-format weights for --checkpoint) that are wrong in one way each.
    good = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=2)
    save_file(good.state_dict(), str(tmp / "good.safetensors"))
    data = (tmp / "good.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip archive" * 10)
    other = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=2, embed_dim=32)
    save_file(other.state_dict(), str(tmp / "other_model.safetensors"))

    # Architectures for `spvit export --arch`.
    blocks = json.loads((files.run / "arch.json").read_text())["blocks"]
    _write_arch(tmp / "arch_other_model.json", model="deit_tiny_patch16_224")
    _write_arch(tmp / "arch_five_blocks.json", blocks=blocks[:5])
    _write_arch(tmp / "arch_out_of_range.json", blocks=[{"mixer": "msa", "mlp_kept": [0, 500]}, *blocks[1:]])
    _write_arch(tmp / "arch_unknown_mixer.json", blocks=[{"mixer": "conv5", "mlp_kept": [0]}, *blocks[1:]])
    _write_arch(tmp / "arch_wrong_type.json", img_size="32")

    # Lookup tables for another model or image size, and one that is not a table.
    _write_lut(lut, tmp / "lut_other_model.csv", model="deit_tiny_patch16_224")
    _write_lut(lut, tmp / "lut_other_size.csv", img_size=64)
    (tmp / "lut_garbage.csv").write_text("block,item\n1,2\n")

    # Datasets: empty, without images, with a broken image.
    (tmp / "empty").mkdir()
    (tmp / "texts" / "a").mkdir(parents=True)
    (tmp / "texts" / "a" / "notes.txt").write_text("no pixels here")
    (tmp / "broken" / "a").mkdir(parents=True)
    (tmp / "broken" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    # Killed runs (no summary.json) whose checkpoint is cut short, or belongs to another model.
    truncated = _resumable_copy(files.run, tmp / "run_truncated")
    checkpoint = truncated / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    foreign = _resumable_copy(files.run, tmp / "run_foreign")
    _, state = load_checkpoint(foreign / "checkpoint.safetensors")
    save_checkpoint(foreign / "checkpoint.safetensors", load_subnet(folder_subnet).state_dict(), state)
    return files


def _export(f: SimpleNamespace, arch: str) -> list[str]:
    return ["export", "--run", str(f.run), "--arch", str(f.tmp / arch), "--out", str(f.tmp / "subnet_out")]


# (id, command line from the fixture's files, a phrase the one-line message must hold); all exit with code 2.
CASES = [
    # model names and arguments
    ("unknown_model", lambda f: ["lut", "--model", "deit_tiny_patch16"],
     "unknown model 'deit_tiny_patch16'; did you mean deit_tiny_patch16_224"),
    ("unsearchable_model", lambda f: ["lut", "--model", "deit_tiny_distilled_patch16_224"], "cannot be searched"),
    ("malformed_model_kwargs", lambda f: ["lut", "--model", "test_vit", "--model-kwargs", "patch_size"],
     "expects key=value pairs"),
    ("unknown_model_kwarg", lambda f: ["lut", "--model", "test_vit", "--model-kwargs", "patch_sz=4"],
     "unexpected keyword argument 'patch_sz'"),
    # image sizes
    ("img_size_not_a_patch_multiple", lambda f: ["lut", "--model", "test_vit", "--img-size", "30",
                                                 "--model-kwargs", "patch_size=4"],
     "image size 30 does not fit 'test_vit': it must be a multiple of the patch size 4 (e.g. 28 or 32)"),
    ("img_size_below_the_patch", lambda f: [*search(f, "--target", "0.5x"), "--img-size", "2"],
     "must be a multiple of the patch size 4"),
    ("img_size_zero", lambda f: ["lut", "--model", "test_vit", "--img-size", "0"], "positive image size"),
    # budgets
    ("budget_above_range", lambda f: search(f, "--target", "2x", "--lut", str(f.lut)),
     "is outside the search space's range"),
    ("budget_below_range", lambda f: search(f, "--target", "1K", "--lut", str(f.lut)),
     "is outside the search space's range"),
    ("budget_malformed", lambda f: search(f, "--target", "3.2Q", "--lut", str(f.lut)), "malformed budget '3.2Q'"),
    ("budget_zero", lambda f: search(f, "--target", "0x", "--lut", str(f.lut)), "budget '0x' must be positive"),
    ("budget_negative", lambda f: search(f, "--target=-3M", "--lut", str(f.lut)), "budget '-3M' must be positive"),
    ("epochs_zero", lambda f: search(f, "--target", "0.5x", "--epochs", "0"), "--epochs must be at least 1"),
    # architectures
    ("arch_of_another_model", lambda f: _export(f, "arch_other_model.json"),
     "but the architecture has model='deit_tiny_patch16_224'"),
    ("arch_wrong_block_count", lambda f: _export(f, "arch_five_blocks.json"),
     "blocks: architecture has 5 blocks, 'test_vit' has 6"),
    ("arch_index_out_of_range", lambda f: _export(f, "arch_out_of_range.json"),
     "blocks[0].mlp_kept: index 500 is out of range for hidden size 192"),
    ("arch_unknown_mixer", lambda f: _export(f, "arch_unknown_mixer.json"), "blocks[0].mixer: unknown mixer 'conv5'"),
    ("arch_wrong_type", lambda f: _export(f, "arch_wrong_type.json"), "img_size: expected int, got str '32'"),
    ("arch_missing", lambda f: _export(f, "nowhere.json"), "architecture file not found"),
    # checkpoints
    ("checkpoint_truncated",
     lambda f: search(f, "--target", "0.5x", "--checkpoint", str(f.tmp / "truncated.safetensors")),
     "is not a readable safetensors file"),
    ("checkpoint_corrupt", lambda f: search(f, "--target", "0.5x", "--checkpoint", str(f.tmp / "corrupt.pth")),
     "is truncated or corrupt"),
    ("checkpoint_of_another_model",
     lambda f: search(f, "--target", "0.5x", "--checkpoint", str(f.tmp / "other_model.safetensors")),
     "does not fit this model: shape mismatch"),
    ("checkpoint_missing", lambda f: search(f, "--target", "0.5x", "--checkpoint", str(f.tmp / "nowhere.pth")),
     "checkpoint not found"),
    # lookup tables
    ("lut_of_another_model", lambda f: search(f, "--target", "0.5x", "--lut", str(f.tmp / "lut_other_model.csv")),
     "lookup table is for deit_tiny_patch16_224"),
    ("lut_of_another_img_size", lambda f: search(f, "--target", "0.5x", "--lut", str(f.tmp / "lut_other_size.csv")),
     "at img_size 64 with 2 classes, but the supernet has img_size=32"),
    ("lut_not_a_table", lambda f: search(f, "--target", "0.5x", "--lut", str(f.tmp / "lut_garbage.csv")),
     "is not a valid lookup table"),
    # datasets
    ("data_missing", lambda f: search(f, "--target", "0.5x", data=f.tmp / "nowhere"), "dataset folder not found"),
    ("data_empty", lambda f: search(f, "--target", "0.5x", data=f.tmp / "empty"), "no class subfolders"),
    ("data_not_images", lambda f: search(f, "--target", "0.5x", data=f.tmp / "texts"),
     "are not images (e.g. notes.txt)"),
    ("data_broken_image", lambda f: search(f, "--target", "0.5x", data=f.tmp / "broken"), "is not a readable image"),
    ("data_unknown_name", lambda f: search(f, "--target", "0.5x", data="torch/cifar11"), "did you mean cifar10"),
    ("num_classes_mismatch", lambda f: search(f, "--target", "0.5x", "--num-classes", "10"),
     "--num-classes 10 does not match the dataset's 2 classes"),
    ("subnet_classes_mismatch", lambda f: ["finetune", "--subnet", str(f.subnet), "--data", "digits",
                                           "--out", str(f.tmp / "ft"), "--distillation", "none"],
     "the subnet has 2 classes but the dataset 'digits' 10"),
    ("subnet_missing", lambda f: ["finetune", "--subnet", str(f.tmp / "nowhere"), "--out", str(f.tmp / "ft")],
     "not a subnet directory"),
    # run directories and --resume
    ("rerun_without_resume", lambda f: run_args(f, f.run), "already holds a run; pass --resume"),
    ("resume_finished_run", lambda f: run_args(f, f.run, "--resume"), "holds a finished run"),
    ("resume_other_config", lambda f: [*run_args(f, f.run, "--resume"), "--target", "0.7x", "--seed", "1"],
     "target, seed differ"),
    ("resume_nothing", lambda f: run_args(f, f.tmp / "never_started", "--resume"), "nothing to resume"),
    ("resume_truncated_checkpoint", lambda f: run_args(f, f.tmp / "run_truncated", "--resume"),
     "is truncated, corrupt or not an spvit checkpoint"),
    ("resume_checkpoint_of_another_model", lambda f: run_args(f, f.tmp / "run_foreign", "--resume"),
     "does not fit this run (another model or other settings?)"),
]  # fmt: skip


@pytest.mark.parametrize("argv, phrase", [pytest.param(a, p, id=i) for i, a, p in CASES])
def test_bad_input_is_one_line_and_exit_code_2(f, argv, phrase, capsys):
    code = main(argv(f))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("spvit: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert phrase in err, err
    assert "Traceback" not in err


def test_debug_shows_the_traceback_then_the_same_line(f, capsys):
    argv = search(f, "--target", "0.5x", "--checkpoint", str(f.tmp / "truncated.safetensors"))
    assert main(["--debug", *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("spvit: error: checkpoint ") and "not a readable safetensors" in err


def test_failed_attempts_leave_the_run_intact(f):
    """None of the refused commands above touched the finished run: it still exports."""
    arch = Architecture.load(f.run / "arch.json")
    assert json.loads((f.run / "summary.json").read_text())["macs"] > 0
    assert main(["export", "--run", str(f.run), "--out", str(f.tmp / "exported")]) == 0
    assert load_subnet(f.tmp / "exported").arch == arch
    assert not list(f.run.glob(".*.tmp"))
    assert torch.isfinite(next(iter(load_checkpoint(f.run / "checkpoint.safetensors")[0].values()))).all()


def test_exit_codes_are_documented_in_the_help():
    text = build_parser().format_help()
    for code in (0, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_IO_ERROR, EXIT_INTERRUPTED):
        assert f"\n  {code} " in text
    assert "--debug" in text and "disk full" in text and "--resume" in text

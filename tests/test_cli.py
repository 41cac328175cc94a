"""The `spvit` command line: subcommands, their output, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from lookup_tables import LookupTable
from spvit_search.cli import EXIT_BAD_INPUT, main
from spvit_search.runs import parse_model_kwargs

TINY_ARGS = ["--model", "test_vit", "--img-size", "32", "--num-classes", "10", "--model-kwargs", "patch_size=4"]


def test_lut_prints_the_range_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "lut.csv"
    assert main(["lut", *TINY_ARGS, "--convention", "core", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lut = LookupTable.load(out)
    low, high = lut.range()
    assert f"dense {lut.dense_flops() / 1e9:.4f} GMACs" in printed
    assert f"range {low / 1e9:.4f} .. {high / 1e9:.4f} GMACs" in printed
    assert printed.count("\n") >= 6 + 4  # header lines and one table row per block
    assert lut.meta["convention"] == "core" and lut.meta["model_kwargs"] == {"patch_size": 4}


def test_unknown_model_is_one_line_with_suggestions(capsys):
    assert main(["lut", "--model", "deit_tiny_patch16"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("spvit: error: unknown model 'deit_tiny_patch16'; did you mean deit_tiny_patch16_224")
    assert "Traceback" not in err and err.count("\n") == 1


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "lut", "--model", "nope_model"]) == EXIT_BAD_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_model_kwargs_parse_literals():
    assert parse_model_kwargs(["patch_size=4", "qkv_bias=False", "act_layer=gelu"]) == {
        "patch_size": 4,
        "qkv_bias": False,
        "act_layer": "gelu",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_model_kwargs(["patch_size"])

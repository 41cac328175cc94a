"""Settings have one source: the flags, defaults and help of a command come from its config dataclass, and a
`--config FILE` (YAML or JSON) sets the defaults that the command line overrides."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

import pytest

from finetune import engine
from reports import run_format
from spvit_search.cli import EXIT_BAD_INPUT, build_parser, main
from spvit_search.finetuning import FinetuneConfig
from spvit_search.runs import parse_model_kwargs
from spvit_search.search import SearchConfig
from spvit_search.settings import SETTING, SettingsParser, add_settings, group, inherit, settings_from_args

TINY = {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
REQUIRED = ["--model", "test_vit", "--target", "0.7x", "--out", "run"]

example = group("example")


@dataclass(kw_only=True)
class Example:
    name: str = example(help="a required name")
    size: int | None = example(None, help="a size", default_text="the model's")
    rate: float = example(0.5, help="a rate", aliases=("--speed",))
    fast: bool = example(True, help="go fast")
    ratios: list[float] = example(factory=lambda: [0.5, 1.0], help="some ratios")
    kwargs: dict = example(factory=dict, help="k=v pairs", nargs="*", parse=parse_model_kwargs)


@dataclass(kw_only=True)
class Derived(Example):
    rate: float = inherit(Example, "rate", 0.25)


def example_parser(config: type = Example) -> SettingsParser:
    parser = SettingsParser(prog="example")
    add_settings(parser, config)
    return parser


def test_flags_defaults_and_types_come_from_the_fields():
    args = example_parser().parse_args(["--name", "x", "--speed", "2", "--no-fast", "--ratios", "1", "--kwargs", "a=4"])
    assert settings_from_args(Example, args) == Example(name="x", rate=2.0, fast=False, ratios=[1.0], kwargs={"a": 4})
    assert settings_from_args(Example, example_parser().parse_args(["--name", "x"])) == Example(name="x")
    assert settings_from_args(Derived, example_parser(Derived).parse_args(["--name", "x"])).rate == 0.25
    with pytest.raises(SystemExit):  # a field without a default is a required flag
        example_parser().parse_args([])


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        example_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for line in ("--name NAME a required name (required)", "--size SIZE a size (default: the model's)",
                 "--rate RATE, --speed RATE a rate (default: 0.5)", "--fast, --no-fast go fast (default: on)",
                 "some ratios (default: 0.5 1.0)", "k=v pairs (default: none)"):  # fmt: skip
        assert line in text


@pytest.mark.parametrize("command", ["lut", "search", "export", "finetune", "eval", "demo", "report"])
def test_every_flag_of_every_command_has_help_and_a_default(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        text = formatter._get_help_string(action)
        assert action.help, action.dest
        assert re.search(r"\((default: .+|required|required unless --[a-z-]+ is given)\)$", text), (action.dest, text)


@pytest.mark.parametrize(
    "alias, canonical, field, value",
    [
        ("--smoothing", "--label-smoothing", "label_smoothing", 0.2),
        ("--clip-grad", "--grad-clip", "grad_clip", 1.0),
        ("--workers", "--num-workers", "num_workers", 3),
        ("--distillation-type", "--distillation", "distillation", "hard"),
    ],
)
def test_timm_spellings_are_aliases_of_the_fields(alias, canonical, field, value):
    configs = [
        settings_from_args(SearchConfig, build_parser().parse_args(["search", *REQUIRED, flag, str(value)]))
        for flag in (alias, canonical)
    ]
    assert getattr(configs[0], field) == getattr(configs[1], field) == value


def test_finetune_aliases_and_the_clip_grad_zero_that_turns_clipping_off():
    args = build_parser().parse_args(
        ["finetune", "--subnet", "s", "--out", "o", "--teacher-path", "t.pth", "--model-ema", "--clip-grad", "0"]
    )
    config = settings_from_args(FinetuneConfig, args)
    assert (config.teacher_checkpoint, config.model_ema, config.grad_clip) == ("t.pth", True, None)
    assert (config.epochs, config.lr, config.distillation) == (30, 5e-4, "soft")  # finetune's own defaults


def test_a_json_config_sets_defaults_and_flags_override_it(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "test_vit", "target": "0.5x", "out": "o", "epochs": 5, "lr": 0.01}))
    args = build_parser().parse_args(["search", "--config", str(path), "--epochs", "2"])
    config = settings_from_args(SearchConfig, args)
    assert (config.model, config.target, config.epochs, config.lr) == ("test_vit", "0.5x", 2, 0.01)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--config", str(path), "--help"])
    assert "(default: 0.01)" in capsys.readouterr().out  # --help shows the file's defaults


def test_a_yaml_config_runs_a_search_and_config_json_records_the_merged_settings(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model: test_vit\nimg_size: 16\nmodel_kwargs: {json.dumps(TINY)}\ntarget: 0.7x\nout: {out}\n"
        "epochs: 3\nlr: 1e-3\ndevice: cpu\nprogress: false\nlog_every: 100\n"  # YAML reads 1e-3 as a string
    )
    assert main(["search", "--config", str(path), "--epochs", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "search" and json.loads((out / "summary.json").read_text())["kind"] == "search"
    assert (config["epochs"], config["lr"], config["model_kwargs"], config["progress"]) == (1, 0.001, TINY, False)
    assert set(config) == {"kind", *(f.name for f in fields(SearchConfig))}
    # A run's config.json is a --config of its own: the same settings, another directory.
    again = settings_from_args(
        SearchConfig, build_parser().parse_args(["search", "--config", str(out / "config.json"), "--out", "other"])
    )
    assert {**SearchConfig.from_dict(config).__dict__, "out": "other"} == again.__dict__


BAD_FILES = {
    "unknown key": ("smoothing: 0.2\n", "cfg.yaml: unknown setting 'smoothing'; did you mean label_smoothing"),
    "wrong type": ("epochs: two\n", "cfg.yaml: epochs: invalid literal for int() with base 10: 'two'"),
    "wrong choice": ("amp: fp8\n", "cfg.yaml: amp: 'fp8' is not one of auto, none, bf16, fp16"),
    "not a mapping": ("- 1\n", "holds a list, not a mapping of settings"),
    "bad yaml": ("epochs: [1\n", "is not valid YAML"),
    "another kind": ("kind: finetune\n", "holds the settings of a 'finetune' run, not of a 'search' or 'optuna' run"),
}


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert main(["search", "--config", str(path), *REQUIRED]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("spvit: error: ") and message in err and err.count("\n") == 1


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["finetune", "--config", str(tmp_path / "nope.yaml")]) == EXIT_BAD_INPUT
    assert (
        capsys.readouterr().err
        == f"spvit: error: cannot read --config {tmp_path / 'nope.yaml'}: No such file or directory\n"
    )


def test_every_setting_flag_is_a_field():
    for config in (SearchConfig, FinetuneConfig):
        assert all(SETTING in f.metadata for f in fields(config))


def test_the_training_engine_writes_the_files_the_run_format_names():
    # finetune/ may not import reports/: the engine names its files itself, and they must be the format's.
    assert (engine.CHECKPOINT, engine.METRICS) == (run_format.CHECKPOINT, run_format.METRICS)

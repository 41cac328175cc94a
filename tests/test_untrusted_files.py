"""Untrusted files: no load can run code, and every JSON (or CSV header) input is checked field by field.

A pickle whose `__reduce__` would create a marker directory stands for any code an attacker could plant in a
checkpoint: every loader refuses it with a clear error and the marker never appears.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.checkpoint import load_checkpoint, save_checkpoint
from lookup_tables import LookupTable
from spvit_search.cli import EXIT_BAD_INPUT, main
from spvit_search.export import load_search_supernet, load_subnet
from spvit_search.finetuning import FinetuneConfig
from spvit_search.search import SearchConfig
from supernets import Architecture, build_supernet
from supernets.checkpoints import load_state_dict_file

REPO = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("spvit_search", "supernets", "lookup_tables", "finetune", "reports", "benchmarks")
MODEL = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4"]


# -- static audit ------------------------------------------------------------------------------------------------------

# Calls that unpickle (or evaluate) data: never on a file a user hands us.
FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load",
    "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pd.read_pickle",
    "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "torch.jit.load", "eval", "exec",
}  # fmt: skip


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> object:
    value = next((k.value for k in call.keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) else value


def test_every_load_in_the_source_is_weights_only():
    files = [p for package in SOURCE_PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 30
    torch_loads, problems = 0, []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "marshal"):
                loaders = [a.name for a in node.names if a.name in ("load", "loads", "Unpickler")]
                problems += [f"{where}: from {node.module} import {name}" for name in loaders]
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name == "torch.load":
                torch_loads += 1
                if _keyword(node, "weights_only") is not True:
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in FORBIDDEN:
                problems.append(f"{where}: {name}")
            elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}: {name} with allow_pickle")
    assert not problems, problems
    assert torch_loads >= 1  # the audit does see the one place that reads .pth files


# -- a malicious pickle ------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls os.mkdir(marker): any code could stand where mkdir stands."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_malicious(path: Path, marker: Path, zipped: bool = True) -> Path:
    """A checkpoint with real weights and the payload: torch.save's zip format, or a bare pickle."""
    data = {"model": {"w": torch.ones(2)}, "extra": Payload(marker)}
    if zipped:
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data, protocol=2))
    return path


def test_the_payload_does_run_code_when_unpickled(tmp_path):
    """The control: what every loader below refuses would otherwise run."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.fixture(scope="module")
def lut_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lut") / "lut.csv"
    assert main(["lut", *MODEL, "--num-classes", "2", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def evil(tmp_path_factory, image_folder, folder_subnet, lut_file) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("untrusted")
    marker = tmp / "pwned"
    ns = SimpleNamespace(tmp=tmp, marker=marker, images=image_folder, subnet=folder_subnet)
    ns.pth = write_malicious(tmp / "evil.pth", marker)
    ns.legacy = write_malicious(tmp / "evil_legacy.pt", marker, zipped=False)
    # The same bytes under the names our own files have.
    ns.as_safetensors = tmp / "evil.safetensors"
    shutil.copy(ns.pth, ns.as_safetensors)
    ns.subnet_dir = shutil.copytree(folder_subnet, tmp / "subnet")
    shutil.copy(ns.pth, ns.subnet_dir / "model.safetensors")
    ns.lut = tmp / "lut.csv"
    shutil.copy(ns.legacy, ns.lut)
    # A search run directory whose supernet is the pickle.
    ns.search_run = tmp / "search_run"
    ns.search_run.mkdir()
    shutil.copy(lut_file, ns.search_run / "lut.csv")
    shutil.copy(folder_subnet / "arch.json", ns.search_run / "arch.json")
    shutil.copy(ns.pth, ns.search_run / "supernet.safetensors")
    # A fine-tuning run killed after its first checkpoint, whose checkpoint was then swapped for the pickle.
    ns.run_args = ["finetune", "--subnet", str(folder_subnet), "--data", str(image_folder), "--batch-size", "8",
                   "--epochs", "1", "--distillation", "none", "--no-progress", "--out", str(tmp / "run")]  # fmt: skip
    assert main(ns.run_args) == 0
    (tmp / "run" / "summary.json").unlink()
    shutil.copy(ns.pth, tmp / "run" / "checkpoint.safetensors")
    return ns


def _cli(argv: list[str]):
    def run(capsys) -> str:
        assert main(argv) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith("spvit: error: ") and err.count("\n") == 1 and "Traceback" not in err
        return err

    return run


LOADERS = {
    "load_state_dict_file(.pth)": lambda e: load_state_dict_file(e.pth),
    "load_state_dict_file(bare pickle)": lambda e: load_state_dict_file(e.legacy),
    "load_state_dict_file(.safetensors)": lambda e: load_state_dict_file(e.as_safetensors),
    "build_supernet(checkpoint_path)": lambda e: build_supernet("test_vit", checkpoint_path=e.pth, img_size=32,
                                                                num_classes=2, patch_size=4),
    "load_checkpoint": lambda e: load_checkpoint(e.as_safetensors),
    "load_search_supernet": lambda e: load_search_supernet(e.as_safetensors),
    "load_subnet": lambda e: load_subnet(e.subnet_dir),
    "LookupTable.load": lambda e: LookupTable.load(e.lut),
    "Architecture.load": lambda e: Architecture.load(e.pth),
    "spvit search --checkpoint": lambda e: _cli(
        ["search", *MODEL, "--data", str(e.images), "--target", "0.5x", "--checkpoint", str(e.pth),
         "--out", str(e.tmp / "search")]),
    "spvit eval --checkpoint": lambda e: _cli(
        ["eval", *MODEL, "--data", str(e.images), "--checkpoint", str(e.legacy)]),
    "spvit finetune --teacher-checkpoint": lambda e: _cli(
        ["finetune", "--subnet", str(e.subnet), "--data", str(e.images), "--teacher-model", "test_vit",
         "--teacher-checkpoint", str(e.pth), "--out", str(e.tmp / "ft")]),
    "spvit finetune --resume": lambda e: _cli([*e.run_args, "--resume"]),
    "spvit export --run": lambda e: _cli(["export", "--run", str(e.search_run), "--out", str(e.tmp / "x")]),
}  # fmt: skip


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_every_loader_refuses_the_malicious_pickle_and_runs_nothing(evil, load, capsys):
    try:
        result = load(evil)
    except ValueError as e:
        message = str(e)
    else:
        message = result(capsys)  # a CLI command: exit code 2 and one line
    assert any(
        phrase in message
        for phrase in (
            "refusing to load",  # .pth/.pt: weights_only=True met a global it does not allow
            "is not a readable safetensors file",
            "truncated, corrupt or not an spvit checkpoint",
            "is not a valid lookup table",
            "not valid JSON",
        )
    ), message
    assert not evil.marker.exists()


# -- schema validation of JSON inputs ----------------------------------------------------------------------------------

ARCH = {"model": "test_vit", "img_size": 32, "num_classes": 2, "blocks": [{"mixer": "msa", "mlp_kept": [0, 1]}]}
BAD_ARCHS = {
    "not an object": ([ARCH], "architecture must be a JSON object, got list"),
    "img_size a string": ({**ARCH, "img_size": "32"}, "img_size: expected int, got str '32'"),
    "num_classes a bool": ({**ARCH, "num_classes": True}, "num_classes: expected int, got bool"),
    "blocks an object": ({**ARCH, "blocks": {"0": "msa"}}, "blocks: expected list, got dict"),
    "mixer a number": ({**ARCH, "blocks": [{"mixer": 3, "mlp_kept": []}]}, "blocks[0].mixer: expected str"),
    "index a float": ({**ARCH, "blocks": [{"mixer": "msa", "mlp_kept": [0, 1.5]}]},
                      "blocks[0].mlp_kept[1]: expected int, got float"),
    "unknown field": ({**ARCH, "extra": 1}, "extra: unknown field"),
    "missing field": ({k: v for k, v in ARCH.items() if k != "model"}, "model: required field is missing"),
}  # fmt: skip


@pytest.mark.parametrize("data, message", BAD_ARCHS.values(), ids=BAD_ARCHS.keys())
def test_arch_json_is_schema_checked(tmp_path, data, message):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"^{path}: ") as caught:
        Architecture.load(path)
    assert message in str(caught.value)


BAD_CONFIGS = {
    "not an object": (SearchConfig, ["model"], "is a JSON object, not list"),
    "epochs a string": (SearchConfig, {"model": "test_vit", "epochs": "10"}, "epochs: expected int, got str '10'"),
    "lr a bool": (FinetuneConfig, {"subnet": "s", "lr": True}, "lr: expected float, got bool"),
    "model_kwargs a list": (SearchConfig, {"model": "m", "model_kwargs": []}, "model_kwargs: expected dict"),
    "checkpoint a number": (SearchConfig, {"model": "m", "checkpoint": 3}, "checkpoint: expected str | None"),
    "unknown field": (FinetuneConfig, {"subnet": "s", "teacher": "x"}, "unknown FinetuneConfig field 'teacher'"),
}


@pytest.mark.parametrize("cls, data, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_run_config_json_is_schema_checked(cls, data, message):
    with pytest.raises(ValueError) as caught:
        cls.from_dict(data)
    assert message in str(caught.value)


def test_run_config_types_round_trip():
    config = SearchConfig(model="test_vit", checkpoint="w.pth", img_size=32, model_kwargs={"patch_size": 4})
    assert SearchConfig.from_dict(json.loads(json.dumps(config.__dict__))) == config
    assert SearchConfig.from_dict({"model": "m", "lr": 1, "grad_clip": None}).lr == 1  # an int is a valid float


def test_resume_with_a_tampered_config_json_is_one_line(evil, tmp_path, capsys):
    run = shutil.copytree(evil.tmp / "run", tmp_path / "run")
    config = json.loads((run / "config.json").read_text()) | {"epochs": "1"}
    (run / "config.json").write_text(json.dumps(config))
    args = [*evil.run_args[:-1], str(run), "--resume"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"spvit: error: {run / 'config.json'} is not a valid run config: epochs: expected int, got str '1'\n"


def _lut_with(source: Path, path: Path, header: dict | None = None, body=None) -> Path:
    first, _, rest = source.read_text().partition("\n")
    meta = json.loads(first.removeprefix("# ")) | (header or {})
    path.write_text(f"# {json.dumps(meta)}\n{body(rest) if body else rest}")
    return path


BAD_LUTS = {
    "img_size a string": ({"img_size": "32"}, None, "header: img_size: expected int, got str"),
    "model_kwargs a list": ({"model_kwargs": [4]}, None, "header: model_kwargs: expected dict"),
    "no convention": ({"convention": None}, None, "header: convention: expected str"),
    "unknown convention": ({"convention": "guess"}, None, "convention 'guess'"),
    "negative MACs": (None, lambda body: body.replace(",mixer,msa,", ",mixer,msa,-", 1), "must not be negative"),
    "MACs not a number": (None, lambda body: body.replace(",mixer,msa,", ",mixer,msa,x", 1), "column macs: 'x"),
    "a block's rows missing": (None, lambda body: "\n".join(l for l in body.splitlines() if not l.startswith("3,")),
                               "every one of the 6 blocks needs"),
}  # fmt: skip


@pytest.mark.parametrize("header, body, message", BAD_LUTS.values(), ids=BAD_LUTS.keys())
def test_lut_csv_is_schema_checked(lut_file, tmp_path, header, body, message):
    path = _lut_with(lut_file, tmp_path / "lut.csv", header, body)
    with pytest.raises(ValueError, match="is not a valid lookup table") as caught:
        LookupTable.load(path)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "change, message",
    [({"model_args": {"fold_bn": "yes"}}, "fold_bn: expected bool"),
     ({"model_args": {"model_kwargs": [4]}}, "model_kwargs: expected dict"),
     ({"spvit": {"format": "pickle"}}, "spvit.format: expected 'spvit-search subnet'"),
     ({"spvit": {"version": 99}}, "version 99 is not 2")],
    ids=["fold_bn a string", "model_kwargs a list", "another format", "another version"],
)  # fmt: skip
def test_subnet_config_json_is_schema_checked(folder_subnet, tmp_path, change, message):
    subnet = shutil.copytree(folder_subnet, tmp_path / "subnet")
    config = json.loads((subnet / "config.json").read_text())
    for key, fields in change.items():
        config[key] |= fields
    (subnet / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as caught:
        load_subnet(subnet)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "change, message",
    [({"img_size": "32"}, "config.img_size: expected int"),
     ({"gates": {"init": 1, "sharpness": 2}}, "sharpness"),
     ({"model_kwargs": "patch_size=4"}, "config.model_kwargs: expected dict"),
     ({"gates": None}, "gates: expected dict")],
    ids=["img_size a string", "unknown gate setting", "model_kwargs a string", "gates null"],
)  # fmt: skip
def test_supernet_config_is_schema_checked(tmp_path, change, message):
    net = build_supernet("test_vit", img_size=32, num_classes=2, patch_size=4)
    path = tmp_path / "supernet.safetensors"
    save_checkpoint(path, net.state_dict(), {"config": net.config() | change})
    with pytest.raises(ValueError, match="invalid supernet config") as caught:
        load_search_supernet(path)
    assert message in str(caught.value)

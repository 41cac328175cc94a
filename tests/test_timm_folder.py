"""A subnet directory is a timm model folder: `timm.create_model("local-dir:DIR")` (and, through timm's Hub loader,
"hf-hub:user/name") builds what `load_subnet` builds from config.json alone; its model card states the figures of
the run that wrote it; directories of format 1 still load; a malformed config.json is a clear error."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import timm
import timm.models._hub
import torch
from helpers import randomize_

from lookup_tables import LookupTable
from spvit_search.cli import main
from spvit_search.export import (
    TIMM_NAME,
    Lineage,
    export_subnet,
    load_subnet,
    read_subnet_lineage,
    read_subnet_source,
    save_subnet,
)
from supernets import MIXERS, Architecture, BlockChoice, build_supernet

FROZEN = Path(__file__).parent / "data" / "frozen_v1"
# Per family: a tiny model, its image size and timm kwargs (as in test_family_contract).
TINY_MODELS = {
    "vit": ("test_vit", 16, dict(patch_size=4, embed_dim=16, depth=3, num_heads=2)),
    "cait": ("cait_xxs24_224", 16, dict(patch_size=4, embed_dim=16, depth=2, num_heads=2)),
    "t2t_vit": ("t2t_vit_7", 32, dict(embed_dim=32, depth=2, num_heads=2, token_dim=8)),
    "sret": ("sret_t", 64, dict(base_dim=8, heads=[1, 2, 4], depth=[4, 2, 2], recursive_num=[2, 1, 1])),
}


def logits(model: torch.nn.Module, img_size: int) -> torch.Tensor:
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def exported(request, tmp_path_factory):
    """(the in-memory subnet of a non-trivial architecture, its saved directory, its image size) for a family."""
    name, img_size, kwargs = TINY_MODELS[request.param]
    torch.manual_seed(0)
    net = randomize_(build_supernet(name, img_size=img_size, num_classes=10, **kwargs), seed=1).eval()
    dense = net.dense_architecture()
    blocks = [BlockChoice(MIXERS[i % len(MIXERS)], b.mlp_kept[::2]) for i, b in enumerate(dense.blocks)]
    subnet = export_subnet(net, dataclasses.replace(dense, blocks=tuple(blocks)))
    directory = tmp_path_factory.mktemp(request.param) / "subnet"
    save_subnet(subnet, directory)
    return subnet, directory, img_size


def test_local_dir_builds_what_load_subnet_builds(exported):
    subnet, directory, img_size = exported
    model = timm.create_model(f"local-dir:{directory}")
    assert type(model) is type(subnet) and not model.training and model.arch == subnet.arch
    expected = logits(subnet, img_size)
    assert (logits(model, img_size) - expected).abs().max() <= 1e-6
    assert (logits(load_subnet(directory), img_size) - expected).abs().max() <= 1e-6
    assert (logits(timm.create_model(TIMM_NAME, subnet_dir=directory), img_size) - expected).abs().max() <= 1e-6
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, img_size, img_size)


def test_config_json_is_a_timm_model_folder_config(exported):
    subnet, directory, img_size = exported
    config = json.loads((directory / "config.json").read_text())
    assert {"architecture", "num_classes", "num_features", "pretrained_cfg", "model_args"} <= set(config)
    assert config["architecture"] == TIMM_NAME and config["num_classes"] == 10
    assert config["num_features"] == subnet.head.in_features
    cfg = config["pretrained_cfg"]
    assert tuple(cfg["input_size"]) == (3, img_size, img_size) and cfg["fixed_input_size"] is True
    assert {"mean", "std", "interpolation", "crop_pct", "crop_mode"} <= set(cfg)
    assert not {"url", "file", "hf_hub_id"} & set(cfg)  # the source model's weights are not this folder's
    assert Architecture.from_dict(config["model_args"]["arch"]) == subnet.arch
    assert config["spvit"]["format"] == "spvit-search subnet" and config["spvit"]["version"] == 2


def test_config_json_alone_describes_the_model(exported, tmp_path):
    subnet, directory, img_size = exported
    folder = shutil.copytree(directory, tmp_path / "folder")
    (folder / "arch.json").unlink()
    expected = logits(subnet, img_size)
    assert (logits(timm.create_model(f"local-dir:{folder}"), img_size) - expected).abs().max() <= 1e-6
    assert load_subnet(folder).arch == subnet.arch


def test_hf_hub_loads_the_uploaded_folder(exported, monkeypatch):
    """The Hub is simulated where timm downloads a file: the folder's files stand in for the repository's."""
    subnet, directory, img_size = exported
    requested = []

    def download(repo_id, filename, revision=None, cache_dir=None):
        requested.append((repo_id, filename))
        return str(directory / filename)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    model = timm.create_model("hf-hub:user/name")
    assert (logits(model, img_size) - logits(subnet, img_size)).abs().max() <= 1e-6
    assert requested == [("user/name", "config.json"), ("user/name", "model.safetensors")]


def test_format_1_directories_still_load():
    for family in ("t2t", "sret", "cait"):
        recorded = torch.load(FROZEN / f"subnet_{family}" / "io.pt", weights_only=True)
        model = timm.create_model(TIMM_NAME, subnet_dir=FROZEN / f"subnet_{family}")
        with torch.no_grad():
            torch.testing.assert_close(model(recorded["x"]), recorded["y"], rtol=1e-5, atol=1e-5)
    best = FROZEN / "finetune_vit" / "best"
    assert read_subnet_source(best) == json.loads((best / "config.json").read_text())["source"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(timm.create_model(TIMM_NAME, subnet_dir=best)(x), load_subnet(best)(x))


def test_format_1_directory_saved_again_is_a_timm_folder(tmp_path):
    old = FROZEN / "finetune_vit" / "best"
    save_subnet(load_subnet(old), tmp_path / "new", read_subnet_lineage(old))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{tmp_path / 'new'}")(x), load_subnet(old)(x))
    assert read_subnet_source(tmp_path / "new") == json.loads((old / "config.json").read_text())["source"]


# -- model cards ------------------------------------------------------------------------------------


def dense_mlp_widths() -> list[int]:
    """test_vit's MLP hidden sizes (the search fixtures' dense model), as timm builds it."""
    return [b.mlp.fc1.out_features for b in timm.create_model("test_vit", img_size=32, patch_size=4).blocks]


def check_architecture_table(card: str, arch: Architecture) -> None:
    for i, (block, hidden) in enumerate(zip(arch.blocks, dense_mlp_widths(), strict=True)):
        assert f"| {i} | {block.mixer} | {len(block.mlp_kept):,} / {hidden:,} " in card


def check_usage(card: str, directory: Path) -> None:
    assert card.index("import spvit_search") < card.index(f'timm.create_model("local-dir:{directory}")')
    assert 'timm.create_model("hf-hub:user/name")' in card


def test_export_card_states_the_search_summary(subnet_dir, search_run, dense_checkpoint):
    card = (subnet_dir / "README.md").read_text()
    summary = json.loads((search_run / "summary.json").read_text())
    for key in ("macs", "params", "dense_macs", "dense_params", "target_macs"):
        assert f"{summary[key]:,}" in card, key
    for key in ("val_acc1", "val_acc5"):
        assert f"{summary[key]:.2f}%" in card, key
    assert f"{summary['macs'] / summary['dense_macs']:.3f}x" in card
    assert str(search_run.resolve()) in card and str(dense_checkpoint.resolve()) in card
    check_architecture_table(card, Architecture.load(search_run / "arch.json"))
    check_usage(card, subnet_dir)
    lineage = read_subnet_lineage(subnet_dir)
    assert lineage.search_run == str(search_run.resolve()) and lineage.finetune_run is None
    assert lineage.search_target == {"macs": summary["target_macs"]}


def test_an_architecture_other_than_the_runs_gets_no_search_accuracy(search_run, tmp_path):
    arch = Architecture.load(search_run / "arch.json")
    other = dataclasses.replace(arch, blocks=tuple(BlockChoice("msa", b.mlp_kept) for b in arch.blocks))
    other.save(tmp_path / "other.json")
    out = tmp_path / "subnet"
    assert main(["export", "--run", str(search_run), "--arch", str(tmp_path / "other.json"), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    summary = json.loads((search_run / "summary.json").read_text())
    assert f"{summary['val_acc1']:.2f}%" not in card and "Not measured." in card
    lut = LookupTable.load(search_run / "lut.csv")
    assert f"{lut.flops(other):,}" in card and f"{lut.params(other):,}" in card and f"{summary['dense_macs']:,}" in card
    check_architecture_table(card, other)


@pytest.fixture
def searched_subnet(folder_subnet, tmp_path) -> Path:
    """`folder_subnet` with a lineage: a dense test_vit (random initial weights) and a search run."""
    source = {"model": "test_vit", "pretrained": False, "checkpoint": None, "img_size": 32, "num_classes": 2,
              "model_kwargs": {"patch_size": 4}}  # fmt: skip
    lineage = Lineage(source, search_run="/runs/search", search_target={"macs": 123456})
    save_subnet(load_subnet(folder_subnet), tmp_path / "subnet", lineage)
    return tmp_path / "subnet"


def test_finetune_cards_state_the_finetune_summary(searched_subnet, image_folder, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--subnet", str(searched_subnet), "--out", str(out), "--no-progress", "--epochs", "1"]
    assert main([*args, "--data", str(image_folder), "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cards = {name: (out / name / "README.md").read_text() for name in ("best", "last")}
    for name, card in cards.items():
        for key in ("macs", "params", "dense_macs", "dense_params"):
            assert f"{summary[key]:,}" in card, (name, key)
        assert f"{summary['dense_val_acc1']:.2f}%" in card
        assert str(out.resolve()) in card and "/runs/search" in card and "target 123,456 MACs" in card
        check_usage(card, out / name)
        lineage = read_subnet_lineage(out / name)
        assert lineage == dataclasses.replace(read_subnet_lineage(searched_subnet), finetune_run=str(out.resolve()))
    assert f"best epoch: {summary['best_val_acc1']:.2f}%" in cards["best"]
    assert f"last epoch: {summary['val_acc1']:.2f}%" in cards["last"]
    assert f"last epoch: {summary['val_acc5']:.2f}%" in cards["last"]


# -- bad input --------------------------------------------------------------------------------------


def break_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model_args"].pop("arch"), "model_args.arch: required field is missing"),
        (lambda c: c["model_args"].update(fold_bn="yes"), "fold_bn: expected bool"),
        (lambda c: c["model_args"].update(drop_rate=0.1), "model_args.drop_rate: unknown field"),
        (lambda c: c["model_args"]["arch"].update(blocks=[]), "model_args.arch: blocks: an architecture needs"),
        (lambda c: c.update(architecture="vit_base_patch16_224"), "architecture: expected 'spvit_subnet'"),
        (lambda c: c["spvit"].update(version=99), "subnet format version 99 is not 2"),
        (lambda c: c["spvit"].update(search_run=5), "spvit.search_run: expected str"),
        (lambda c: c["spvit"].update(search_target={"gmacs": 1}), "spvit.search_target.gmacs: unknown field"),
        (lambda c: c.pop("spvit"), "is not an spvit-search subnet config"),
    ],
    ids=["no arch", "fold_bn a string", "unknown argument", "no blocks", "another entry point", "another version",
         "search_run a number", "unknown target unit", "no lineage"],
)  # fmt: skip
def test_a_malformed_config_json_is_a_clear_error(folder_subnet, tmp_path, edit, message):
    directory = shutil.copytree(folder_subnet, tmp_path / "subnet")
    break_config(directory, edit)
    with pytest.raises(ValueError, match="config.json") as caught:
        load_subnet(directory)
    assert message in str(caught.value)


def test_timm_reports_bad_model_args_as_value_errors(folder_subnet, tmp_path):
    directory = shutil.copytree(folder_subnet, tmp_path / "subnet")
    break_config(directory, lambda c: c["model_args"].pop("fold_bn"))
    with pytest.raises(ValueError, match=r"subnet: model_args.fold_bn: required field is missing"):
        timm.create_model(f"local-dir:{directory}")
    with pytest.raises(ValueError, match="needs subnet_dir=DIR"):
        timm.create_model(TIMM_NAME)


def test_architectures_that_disagree_are_a_clear_error(folder_subnet, tmp_path):
    directory = shutil.copytree(folder_subnet, tmp_path / "subnet")
    arch = Architecture.load(directory / "arch.json")
    blocks = list(arch.blocks)
    i = next(i for i, b in enumerate(blocks) if b.mlp_kept != tuple(range(len(b.mlp_kept))))
    blocks[i] = BlockChoice(blocks[i].mixer, tuple(range(len(blocks[i].mlp_kept))))  # as many units: fits the weights
    dataclasses.replace(arch, blocks=tuple(blocks)).save(directory / "arch.json")
    with pytest.raises(ValueError, match="arch.json and config.json's model_args.arch are different architectures"):
        load_subnet(directory)


def test_the_cli_reports_a_malformed_config_in_one_line(folder_subnet, tmp_path, capsys):
    directory = shutil.copytree(folder_subnet, tmp_path / "subnet")
    (directory / "config.json").write_text('{"architecture": "spvit_subnet", ')
    assert main(["eval", "--subnet", str(directory), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spvit: error: {directory / 'config.json'} is not valid JSON") and err.count("\n") == 1

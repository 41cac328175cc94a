"""Export: the plain subnet computes what the supernet computes with the architecture fixed, costs what the
lookup table says, saves and loads as data, and refuses a directory whose arch.json lies about its weights."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from helpers import (
    check_parity,
    every_mixer_architecture,
    fvcore_macs,
    max_difference,
    outputs,
    random_architecture,
    randomize_,
)

from lookup_tables import LookupTable, build_lookup_table
from spvit_search.cli import EXIT_BAD_INPUT, main
from spvit_search.export import (
    TIMM_NAME,
    export_subnet,
    load_search_supernet,
    load_subnet,
    read_released_architectures,
    round_mlp,
    save_subnet,
)
from spvit_search.search import SearchConfig, run_search
from supernets import Architecture, BlockChoice, VisionTransformerSubnet, build_supernet

RELEASED = Path(__file__).resolve().parent / "data" / "spvit_released_archs.json"  # from ../shared/reference
DEIT_TINY = dict(model="deit_tiny_patch16_224", img_size=224, num_classes=1000)
ONNX_EXPORTER = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))  # what torch.onnx.export needs


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return randomize_(build_supernet("deit_tiny_patch16_224"), seed=2, scale=0.05)


# -- parity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_test_vit_subnet_matches_the_supernet(tiny_supernet, tmp_path, seed):
    arch = every_mixer_architecture(seed, depth=6, hidden=192, model="test_vit", img_size=32, num_classes=10)
    check_parity(tiny_supernet, arch, torch.randn(3, 3, 32, 32), tmp_path)


def test_deit_tiny_subnets_match_the_supernet(deit_tiny, tmp_path):
    torch.manual_seed(0)
    arch = every_mixer_architecture(3, depth=12, hidden=768, **DEIT_TINY)
    check_parity(deit_tiny, arch, torch.randn(1, 3, 224, 224), tmp_path / "mixed")
    arch = random_architecture(depth=12, hidden=768, seed=11, **DEIT_TINY)
    check_parity(deit_tiny, arch, torch.randn(2, 3, 224, 224), tmp_path / "random")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"qkv_bias": False, "init_values": 0.1},  # conv without bias (until BN folds into it), LayerScale
        {"class_token": False, "global_pool": "avg"},  # no prefix token
        {"reg_tokens": 2, "no_embed_class": True, "qk_norm": True},  # three prefix tokens, q/k norms
    ],
)
def test_timm_variants_export_too(tmp_path, kwargs):
    torch.manual_seed(0)
    net = randomize_(build_supernet("test_vit", img_size=32, num_classes=10, patch_size=4, **kwargs), seed=3)
    arch = every_mixer_architecture(5, depth=6, hidden=192, model="test_vit", img_size=32, num_classes=10)
    check_parity(net, arch, torch.randn(2, 3, 32, 32), tmp_path)


def test_dense_subnet_is_the_timm_model(tiny_timm_vit, tiny_supernet):
    """Every block msa with every unit: the subnet is timm's model again, state dict names included."""
    subnet = export_subnet(tiny_supernet, tiny_supernet.dense_architecture())
    x = torch.randn(2, 3, 32, 32)
    tiny_supernet.eval()
    with torch.no_grad():
        assert (subnet(x) - tiny_supernet(x)).abs().max() <= 1e-5
    renamed = {k.replace(".mixer.", ".attn."): v.shape for k, v in subnet.state_dict().items()}
    assert renamed == {k: v.shape for k, v in tiny_timm_vit.state_dict().items()}


def test_subnet_is_independent_of_the_supernet(tiny_supernet):
    arch = random_architecture(seed=5)
    subnet = export_subnet(tiny_supernet, arch)
    supernet_storage = {p.untyped_storage().data_ptr() for p in tiny_supernet.parameters()}
    assert not any(p.untyped_storage().data_ptr() in supernet_storage for p in subnet.parameters())
    assert not any("gates" in name or "head_mix" in name for name in subnet.state_dict())
    assert not subnet.training


# -- honest costs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_fvcore_count_of_the_subnet_is_the_lookup_table_price(tiny_supernet, seed):
    lut = build_lookup_table(tiny_supernet, "fvcore")
    arch = every_mixer_architecture(seed, depth=6, hidden=192, model="test_vit", img_size=32, num_classes=10)
    measured = fvcore_macs(export_subnet(tiny_supernet, arch), 32)
    assert abs(sum(measured.values()) - lut.flops(arch)) <= 0.001 * lut.flops(arch)
    # Folding removes exactly the BN's work and nothing else.
    folded = fvcore_macs(export_subnet(tiny_supernet, arch, fold_bn=True), 32)
    assert folded == {op: n for op, n in measured.items() if op != "batch_norm"}


def test_fvcore_count_of_a_deit_tiny_subnet(deit_tiny):
    lut = build_lookup_table(deit_tiny, "fvcore")
    arch = random_architecture(depth=12, hidden=768, seed=7, **DEIT_TINY)
    measured = sum(fvcore_macs(export_subnet(deit_tiny, arch), 224).values())
    assert abs(measured - lut.flops(arch)) <= 0.001 * lut.flops(arch)


@pytest.mark.parametrize(("name", "mparams"), [("deit_tiny_l200_t10", 4.77), ("deit_base_l008_t60", 41.58)])
def test_released_architectures_have_the_published_folded_size(name, mparams):
    arch = read_released_architectures(RELEASED)[name]
    with torch.device("meta"):  # the modules' shapes, no weights
        subnet = VisionTransformerSubnet(arch, fold_bn=True)
    assert abs(sum(p.numel() for p in subnet.parameters()) / 1e6 - mparams) <= 0.01


# -- the importer ---------------------------------------------------------------------------------------


def test_released_architectures_import():
    archs = read_released_architectures(RELEASED)
    raw = json.loads(RELEASED.read_text())
    assert set(archs) == set(raw) == {"deit_tiny_l200_t10", "deit_base_l008_t60"}
    for name, arch in archs.items():
        assert (arch.model, arch.img_size, arch.num_classes) == (raw[name]["model"], 224, 1000)
        assert arch.mixers == raw[name]["mixers"]
        assert [list(b.mlp_kept) for b in arch.blocks] == raw[name]["mlp_kept"]
    assert archs["deit_base_l008_t60"].mixers[:5] == ["bconv1", "bconv1", "bconv1", "bconv3", "bconv3"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("mixers"), r"deit_tiny_l200_t10\.mixers: required field is missing"),
        (lambda e: e["mixers"].pop(), r"deit_tiny_l200_t10: mixers, mlp_hidden and mlp_kept must be lists"),
        (lambda e: e["mixers"].__setitem__(3, "conv5"), r"deit_tiny_l200_t10: blocks\[3\]\.mixer: unknown mixer"),
        (lambda e: e["mlp_kept"][2].append(900), r"deit_tiny_l200_t10: blocks\[2\]\.mlp_kept: index 900 is out of"),
    ],
)
def test_malformed_released_architectures_are_clear_errors(tmp_path, change, message):
    data = json.loads(RELEASED.read_text())
    change(data["deit_tiny_l200_t10"])
    path = tmp_path / "released.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_released_architectures(path)


# -- save, load, timm ---------------------------------------------------------------------------------


@pytest.fixture
def saved_subnet(tiny_supernet, tmp_path):
    mixers = ("msa", "bconv1", "bconv3", "skip", "msa", "bconv3")
    kept = [tuple(range(0, 192, step)) for step in (1, 2, 3, 5, 7, 192)]
    arch = Architecture("test_vit", 32, 10, tuple(map(BlockChoice, mixers, kept)))
    subnet = export_subnet(tiny_supernet, arch)
    save_subnet(subnet, tmp_path / "subnet")
    return subnet, tmp_path / "subnet"


def test_subnet_directory_holds_data_only(saved_subnet):
    subnet, directory = saved_subnet
    assert sorted(p.name for p in directory.iterdir()) == ["arch.json", "config.json", "model.safetensors"]
    assert Architecture.load(directory / "arch.json") == subnet.arch
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "spvit_subnet"
    assert config["model_args"] == {"arch": subnet.arch.to_dict(), "model_kwargs": {"patch_size": 4}, "fold_bn": False}
    assert config["spvit"] == {
        "format": "spvit-search subnet", "version": 2, "source": None, "search_run": None, "search_target": None,
        "finetune_run": None,
    }  # fmt: skip


def test_timm_create_model_loads_a_subnet_directory(saved_subnet):
    subnet, directory = saved_subnet
    assert TIMM_NAME in timm.list_models("spvit*")
    model = timm.create_model(TIMM_NAME, subnet_dir=directory)
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model, VisionTransformerSubnet) and not model.training
    assert max_difference(outputs(model, x), outputs(subnet, x)) == 0
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="needs subnet_dir"):
        timm.create_model(TIMM_NAME)
    with pytest.raises(ValueError, match="takes only subnet_dir; got drop_rate"):
        timm.create_model(TIMM_NAME, subnet_dir=directory, drop_rate=0.1)


@pytest.mark.parametrize(
    ("block", "field", "value", "message"),
    [
        (2, "mixer", "bconv1", r"blocks\[2\]\.mixer is 'bconv1', but the weights hold a 'bconv3' block"),
        (3, "mixer", "msa", r"blocks\[3\]\.mixer is 'msa', but the weights hold a 'skip' block"),
        (0, "mixer", "skip", r"blocks\[0\]\.mixer is 'skip', but the weights hold a 'msa' block"),
        (1, "mlp_kept", [0, 2, 4], r"blocks\[1\]\.mlp_kept keeps 3 hidden units, the weights 96"),
        (5, "mlp_kept", [], r"blocks\[5\]\.mlp_kept keeps 0 hidden units, the weights 1"),
    ],
)
def test_tampered_arch_json_is_a_clear_error(saved_subnet, block, field, value, message):
    _, directory = saved_subnet
    data = json.loads((directory / "arch.json").read_text())
    data["blocks"][block][field] = value
    (directory / "arch.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{directory}: arch.json does not match model.safetensors: {message}"):
        load_subnet(directory)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["blocks"].pop(), r"subnet: blocks: architecture has 5 blocks, 'test_vit' has 6"),
        (lambda d: d.update(num_classes=20), r"does not fit arch\.json and config\.json .*head\.weight \(10, 64\)"),
        (lambda d: d.update(img_size=64), r"pos_embed \(1, 65, 64\) vs \(1, 257, 64\)"),
    ],
)  # fmt: skip
def test_tampered_sizes_are_clear_errors(saved_subnet, edit, message):
    _, directory = saved_subnet
    data = json.loads((directory / "arch.json").read_text())
    edit(data)
    (directory / "arch.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_subnet(directory)


def test_missing_or_foreign_files_are_clear_errors(saved_subnet):
    _, directory = saved_subnet
    config = directory / "config.json"
    config.write_text(json.dumps({"format": "spvit-search subnet", "version": 1, "model_kwargs": {"patch_size": 4}}))
    with pytest.raises(ValueError, match="fold_bn: required field is missing"):
        load_subnet(directory)
    config.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an spvit-search subnet config"):
        load_subnet(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_subnet(directory)


# -- round_mlp --------------------------------------------------------------------------------------------


def test_round_mlp_adds_back_the_most_important_dropped_units(tiny_supernet):
    torch.manual_seed(0)
    for block in tiny_supernet.blocks:
        torch.nn.init.normal_(block.mlp.gates.logits)
    arch = random_architecture(seed=3)
    rounded = round_mlp(arch, tiny_supernet, 8)
    assert rounded.mixers == arch.mixers
    for block, before, after in zip(tiny_supernet.blocks, arch.blocks, rounded.blocks, strict=True):
        width, kept = len(before.mlp_kept), set(after.mlp_kept)
        assert len(kept) == math.ceil(width / 8) * 8 and kept >= set(before.mlp_kept)
        logits = block.mlp.gates.logits.detach()
        added = kept - set(before.mlp_kept)
        still_dropped = set(range(192)) - kept
        if added and still_dropped:
            assert min(logits[list(added)]) >= max(logits[list(still_dropped)])
    assert round_mlp(rounded, tiny_supernet, 8) == rounded
    assert round_mlp(arch, tiny_supernet, 1) == arch
    assert all(len(b.mlp_kept) == 192 for b in round_mlp(arch, tiny_supernet, 1000).blocks)  # capped at full width
    with pytest.raises(ValueError, match="positive integer"):
        round_mlp(arch, tiny_supernet, 0)


# -- the CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "search"
    config = SearchConfig(
        model="test_vit", img_size=32, model_kwargs={"patch_size": 4}, epochs=1, target="0.7x", out=str(out),
        progress=False,
    )  # fmt: skip
    run_search(config)
    return out


def test_export_command_writes_a_loadable_subnet(search_run, tmp_path, capsys):
    net = load_search_supernet(search_run / "supernet.safetensors")
    lut = LookupTable.load(search_run / "lut.csv")
    # The short search keeps every MLP unit; a sparser architecture makes the rounding visible.
    arch = random_architecture(seed=2)
    arch.save(tmp_path / "sparse.json")
    out = tmp_path / "subnet"
    args = ["export", "--run", str(search_run), "--arch", str(tmp_path / "sparse.json"), "--out", str(out)]
    assert main([*args, "--fold-bn", "--round-mlp", "8"]) == 0
    printed = capsys.readouterr().out
    rounded = round_mlp(arch, net, 8)
    assert f"{lut.flops(arch) / 1e9:.4f} -> {lut.flops(rounded) / 1e9:.4f} GMACs" in printed
    subnet = load_subnet(out)
    params = sum(p.numel() for p in subnet.parameters())
    assert f"{lut.flops(rounded) / 1e9:.4f} GMACs" in printed and f"{params / 1e6:.3f} M params (BN folded)" in printed
    assert subnet.arch == rounded and subnet.bn_folded
    net.eval().fix_architecture(rounded)
    x = torch.randn(2, 3, 32, 32)
    assert max_difference(outputs(subnet, x), outputs(net, x)) <= 1e-4


def test_export_command_defaults_to_the_searched_architecture(search_run, tmp_path, capsys):
    assert main(["export", "--run", str(search_run), "--out", str(tmp_path / "subnet")]) == 0
    assert load_subnet(tmp_path / "subnet").arch == Architecture.load(search_run / "arch.json")
    assert "BN folded" not in capsys.readouterr().out


@pytest.mark.skipif(not ONNX_EXPORTER, reason="onnx and onnxscript are not installed")
def test_export_command_writes_onnx(search_run, tmp_path, capsys):
    assert main(["export", "--run", str(search_run), "--out", str(tmp_path / "subnet"), "--onnx"]) == 0
    assert (tmp_path / "subnet" / "model.onnx").stat().st_size > 0
    printed = capsys.readouterr().out
    checked = importlib.util.find_spec("onnxruntime") is not None
    assert ("onnxruntime matches PyTorch" if checked else "not checked: onnxruntime is not installed") in printed


def test_export_command_without_onnx_fails_before_any_work(search_run, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    assert main(["export", "--run", str(search_run), "--out", str(tmp_path / "subnet"), "--onnx"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("spvit: error: ONNX export needs")
    assert not (tmp_path / "subnet").exists()


def test_export_command_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"spvit: error: run directory not found: {tmp_path / 'nope'}\n"

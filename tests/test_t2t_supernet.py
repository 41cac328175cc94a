"""The T2T-ViT supernet: dense equivalence, searchable depth and width, export parity, lookup table = fvcore,
the published dense counts at full size, and the Optuna space over depth and width."""

from __future__ import annotations

import copy
import dataclasses
import random

import optuna
import pytest
import timm
import torch
from helpers import fvcore_macs, randomize_

from lookup_tables import LookupTable, build_lookup_table, differentiable_flops
from spvit_search.discrete_spaces import discrete_space
from spvit_search.export import export_subnet, load_subnet, save_subnet
from supernets import (
    MIXERS,
    Architecture,
    BlockChoice,
    T2TViTSubnet,
    T2TViTSupernet,
    build_supernet,
    check_model_name,
    list_supernets,
)
from supernets.families.t2t_vit.space import T2TSpace

# A 3×3 token grid at img 48 (odd, so that bconv3 sees borders and a centre); 4 heads of width 16.
TINY = dict(embed_dim=64, depth=3)
IMG, CLASSES = 48, 10
# (depth, heads): the smallest and the full depth, the narrowest and the full width.
SIZES = [(2, 2), (3, 3), (2, 4), (3, 4)]


def tiny_supernet(name: str = "t2t_vit_7", seed: int = 0, **kwargs) -> T2TViTSupernet:
    torch.manual_seed(seed)
    return randomize_(build_supernet(name, img_size=IMG, num_classes=CLASSES, **(TINY | kwargs)), seed)


def random_architecture(net: T2TViTSupernet, depth: int, heads: int, seed: int) -> Architecture:
    """Random mixers (each one within the first four draws) and kept units (empty and full included)."""
    rng = random.Random(seed)
    mixers = rng.sample(MIXERS, len(MIXERS)) + rng.choices(MIXERS, k=depth)
    hidden = net.mlp_hidden[0]
    widths = [0, hidden, *(rng.randint(1, hidden - 1) for _ in range(depth))]
    rng.shuffle(widths)
    blocks = [BlockChoice(mixers[i], tuple(sorted(rng.sample(range(hidden), widths[i])))) for i in range(depth)]
    return Architecture(net.name, IMG, CLASSES, tuple(blocks), {"embed_dim": heads * net.head_dim, "num_heads": heads})


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def fixed_logits(net: T2TViTSupernet, arch: Architecture, x: torch.Tensor) -> torch.Tensor:
    net.fix_architecture(arch)
    try:
        return logits(net, x)
    finally:
        net.release_architecture()


def fvcore_total(model: torch.nn.Module) -> int:
    return sum(fvcore_macs(model, IMG).values())


@pytest.fixture(scope="module")
def net() -> T2TViTSupernet:
    return tiny_supernet()


@pytest.fixture(scope="module")
def luts(net) -> dict[str, LookupTable]:
    return {convention: build_lookup_table(net, convention) for convention in ("fvcore", "core")}


# -- building ---------------------------------------------------------------------------------------


def test_registry_builds_t2t_supernets():
    assert {"t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24"} <= set(list_supernets())
    check_model_name("t2t_vit_t_19")
    net = build_supernet("t2t_vit_t_14", img_size=32, num_classes=CLASSES, embed_dim=64, depth=2, num_heads=4)
    assert isinstance(net, T2TViTSupernet) and net.model_kwargs == {"embed_dim": 64, "depth": 2, "num_heads": 4}
    assert net.config()["model"] == "t2t_vit_t_14" and net.grid_size == (2, 2)
    assert net.discrete_choices() == {"depth": [1, 2], "embed_dim": [32, 48, 64], "num_heads": [2, 3, 4]}
    assert net.no_weight_decay() >= {"cls_token", "pos_embed"}


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_dense_supernet_equals_the_timm_model(name):
    torch.manual_seed(0)
    kwargs = TINY | {"num_heads": 4}
    dense = randomize_(timm.create_model(name, img_size=IMG, num_classes=CLASSES, **kwargs))
    net = T2TViTSupernet(copy.deepcopy(dense), name, model_kwargs=kwargs)
    x = torch.randn(2, 3, IMG, IMG)
    expected = logits(dense, x)
    assert net.architecture() == net.dense_architecture()  # the gates start on
    assert (logits(net, x) - expected).abs().max() <= 1e-5
    assert (fixed_logits(net, net.dense_architecture(), x) - expected).abs().max() <= 1e-5


def test_fixed_architecture_runs_the_first_blocks_at_its_width(net):
    arch = random_architecture(net, depth=2, heads=3, seed=0)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, args: ran.append(args[0].shape[-1])) for b in net.blocks]
    net.fix_architecture(arch)
    try:
        with torch.no_grad():
            assert net.forward_features(torch.randn(2, 3, IMG, IMG)).shape == (2, 10, 48)  # class token + 3×3
    finally:
        net.release_architecture()
        for h in hooks:
            h.remove()
    assert ran == [48, 48]
    assert net.tokens_to_token.project.out_width is None and net.fixed_architecture is None


def test_training_forward_at_full_size_trains_gates_and_weights(net):
    net = copy.deepcopy(net).train()
    net(torch.randn(2, 3, IMG, IMG)).square().mean().backward()
    assert all(p.grad is not None for p in net.gate_parameters())
    assert net.tokens_to_token.project.weight.grad is not None and net.head.weight.grad is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(embed_dim=None), r"embed_dim: 't2t_vit_7' offers 32, 48, 64; the architecture has none"),
        (dict(embed_dim=40, num_heads=3), r"embed_dim: 't2t_vit_7' offers 32, 48, 64; the architecture has 40"),
        (dict(embed_dim=48, num_heads=4), r"embed_dim: 48 is not num_heads × the head width, 4 × 16"),
        (dict(num_heads=1, embed_dim=16), r"embed_dim: 't2t_vit_7' offers .* has 16"),
        (dict(blocks=(BlockChoice("msa", ()),)), r"blocks: architecture has 1 blocks, 't2t_vit_7' offers depths 2, 3"),
        (dict(blocks=(BlockChoice("msa", (128,)),) * 2), r"blocks\[0\]\.mlp_kept: index 128 is out of range"),
    ],
)
def test_architecture_that_does_not_fit_is_a_clear_error(net, change, message):
    arch = random_architecture(net, 3, 4, seed=1)
    blocks = change.pop("blocks", arch.blocks)
    arch = dataclasses.replace(arch, blocks=blocks).with_extras(**change)
    with pytest.raises(ValueError, match=message):
        net.fix_architecture(arch)
    assert net.fixed_architecture is None


def test_family_fields_in_json(net, tiny_supernet, tmp_path):
    arch = random_architecture(net, depth=2, heads=2, seed=2)
    assert '"num_classes": 10, "embed_dim": 32, "num_heads": 2, "blocks"' in arch.to_json()
    arch.save(tmp_path / "arch.json")
    assert Architecture.load(tmp_path / "arch.json") == arch
    assert net.dense_architecture(48).num_heads == 3
    vit_arch = tiny_supernet.dense_architecture()
    assert "embed_dim" not in vit_arch.to_json()  # the other families' JSON is as it was
    with pytest.raises(ValueError, match=r"embed_dim: 'test_vit' has no embed_dim choice, but the architecture sets"):
        tiny_supernet.fix_architecture(vit_arch.with_extras(embed_dim=8))
    for value, message in [('"64"', r"embed_dim: expected int"), ("0", r"embed_dim: must be positive")]:
        (tmp_path / "bad.json").write_text(arch.to_json().replace('"embed_dim": 32', f'"embed_dim": {value}'))
        with pytest.raises(ValueError, match=message):
            Architecture.load(tmp_path / "bad.json")


# -- export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "heads"), SIZES)
def test_exported_subnets_match_the_supernet(net, depth, heads, tmp_path):
    arch = random_architecture(net, depth, heads, seed=10 * depth + heads)
    x = torch.randn(2, 3, IMG, IMG)
    expected = fixed_logits(net, arch, x)
    subnet = export_subnet(net, arch)
    assert isinstance(subnet, T2TViTSubnet) and subnet.arch == arch
    assert (len(subnet.blocks), subnet.embed_dim, subnet.cls_token.shape[-1]) == (depth, heads * 16, heads * 16)
    assert (logits(subnet, x) - expected).abs().max() <= 1e-4
    save_subnet(subnet, tmp_path / "plain")
    loaded = load_subnet(tmp_path / "plain")
    assert loaded.config() == {"family": "t2t_vit", "model_kwargs": TINY, "fold_bn": False}
    assert (logits(loaded, x) - expected).abs().max() <= 1e-4
    folded = export_subnet(net, arch, fold_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert (logits(folded, x) - expected).abs().max() <= 1e-4
    assert timm.data.resolve_model_data_config(loaded)["input_size"] == (3, IMG, IMG)


def test_exported_dense_subnet_is_the_dense_model(net):
    narrow = net.dense_architecture(32)
    subnet = export_subnet(net, narrow)
    assert type(subnet.blocks[0].mixer).__name__ == "PlainAttention" and subnet.blocks[0].mixer.num_heads == 2
    x = torch.randn(2, 3, IMG, IMG)
    assert (logits(subnet, x) - fixed_logits(net, narrow, x)).abs().max() <= 1e-4


# -- lookup table -----------------------------------------------------------------------------------


def test_lookup_table_params_range_and_csv(net, luts, tmp_path):
    lut = luts["fvcore"]
    for heads in (2, 4):  # the dense subnet of a width has no bconv, so its parameters are what the table says
        dense = net.dense_architecture(heads * 16)
        assert lut.params(dense) == sum(p.numel() for p in export_subnet(net, dense).parameters())
    smallest = Architecture(net.name, IMG, CLASSES, (BlockChoice("skip", ()),) * 2, {"embed_dim": 32, "num_heads": 2})
    assert lut.range() == (fvcore_total(export_subnet(net, smallest)), lut.dense_flops())
    assert lut.range(full_size=True)[0] > lut.range()[0]
    assert lut.dense_flops() == fvcore_total(export_subnet(net, net.dense_architecture()))
    lut.save(tmp_path / "lut.csv")
    loaded = LookupTable.load(tmp_path / "lut.csv")
    assert loaded.meta == lut.meta and loaded.meta["discrete_choices"] == net.discrete_choices()
    assert loaded.to_frame().equals(lut.to_frame())
    arch = random_architecture(net, 2, 3, seed=5)
    assert (loaded.flops(arch), loaded.params(arch)) == (lut.flops(arch), lut.params(arch))


def test_tables_without_a_width_column_still_load(tiny_supernet, tmp_path):
    """Tables written before T2T-ViT have no `width` column; they are tables of one width."""
    lut = build_lookup_table(tiny_supernet, "core")
    lut.save(tmp_path / "lut.csv")
    header, body = (tmp_path / "lut.csv").read_text().split("\n", 1)
    old = [",".join(line.split(",")[:-1]) for line in body.splitlines()]  # drop the last column, width
    assert old[0] == "block,item,choice,macs,params,units"
    (tmp_path / "old.csv").write_text(header + "\n" + "\n".join(old) + "\n")
    loaded = LookupTable.load(tmp_path / "old.csv")
    arch = tiny_supernet.dense_architecture()
    assert loaded.to_frame().equals(lut.to_frame()) and loaded.flops(arch) == lut.flops(arch)


def test_gradient_search_prices_the_full_size_gates(net, luts):
    lut = luts["core"]
    lut.check_supernet(net)
    assert differentiable_flops(net, lut).item() == lut.flops(net.architecture()) == lut.dense_flops()


# t2t_vit_14 and t2t_vit_t_14 are counted as dense models in test_t2t_vit.py; the supernet computes the same
# modules, and one full-size table over every width is enough to check the pricing.
@pytest.mark.parametrize(("name", "gmacs", "params"), [("t2t_vit_7", 1.147, 4_310_222)])
def test_full_size_dense_architecture_matches_the_reference(name, gmacs, params):
    """REFERENCE.md: `core` MACs and params_all of the dense model, as the lookup table prices them."""
    torch.manual_seed(0)
    net = build_supernet(name)
    lut = build_lookup_table(net, "core")
    dense = net.dense_architecture()
    assert abs(lut.flops(dense) / 1e9 - gmacs) < 0.005 and lut.flops(dense) == lut.dense_flops()
    assert lut.params(dense) == params
    assert net.grid_size == (14, 14) and net.discrete_choices()["depth"][-1] == len(net.blocks)


# -- Optuna -----------------------------------------------------------------------------------------


def test_optuna_space_samples_depth_and_width(net, luts):
    space = discrete_space(net)
    assert isinstance(space, T2TSpace)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        arch = space.suggest(trial)
        net.validate_architecture(arch)
        assert space.architecture(trial.params) == arch
        assert arch.depth == trial.params["depth"] and arch.num_heads == trial.params["num_heads"]
        seen.add((arch.depth, arch.embed_dim))
        luts["core"].flops(arch)
    assert {d for d, _ in seen} == {2, 3} and len({w for _, w in seen}) > 1

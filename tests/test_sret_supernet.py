"""The SReT supernet: dense equivalence (group splits included), group splits in `Architecture`, export parity,
lookup table = fvcore, the published dense counts at full size, and the Optuna space over group splits."""

from __future__ import annotations

import random

import optuna
import pytest
import timm
import torch
from helpers import check_parity, fvcore_macs, randomize_
from safetensors.torch import save_file

from lookup_tables import LookupTable, build_lookup_table, differentiable_flops
from lookup_tables.counting import CORE_OPERATORS
from spvit_search.discrete_spaces import discrete_space
from spvit_search.export import export_subnet, load_subnet
from supernets import (
    Architecture,
    BlockChoice,
    SReTSubnet,
    SReTSupernet,
    build_supernet,
    check_model_name,
    list_supernets,
)
from supernets.families.sret.space import SReTSpace
from supernets.families.sret.sret import SlicedAttention
from supernets.layers.plain import BottleneckConv

MODEL, IMG, CLASSES = "sret_t", 64, 10
# Grids 8×8, 4×4, 2×2 (64, 16, 4 tokens) of widths 8, 16, 32; stage 0 has two distinct blocks, each applied twice.
KWARGS = dict(base_dim=8, heads=[1, 2, 4], depth=[4, 2, 2], recursive_num=[2, 1, 1], groups=[[4, 2], [2, 1], [1, 1]])
DEFAULT_GROUPS = ((4, 2), (2, 1), (1, 1))
# Each mixer in several stages, at group splits other than the model's (recursive passes with G > 1 permute).
ARCHS = [
    (("msa", "msa", "msa", "msa"), ((8, 4), (1, 2), (2, 1))),
    (("bconv3", "msa", "skip", "bconv1"), ((2, 16), (4, 4), (4, 2))),
    (("skip", "bconv1", "bconv3", "msa"), ((64, 1), (16, 8), (1, 4))),
]


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def architecture(net: SReTSupernet, mixers, groups, seed: int = 0) -> Architecture:
    """`mixers` and `groups` with random kept hidden units (an empty and a full MLP included)."""
    rng = random.Random(seed)
    blocks = []
    for i, (mixer, hidden) in enumerate(zip(mixers, net.mlp_hidden, strict=True)):
        width = [0, hidden][i] if i < 2 else rng.randint(1, hidden - 1)
        blocks.append(BlockChoice(mixer, tuple(sorted(rng.sample(range(hidden), width)))))
    return Architecture(MODEL, IMG, CLASSES, tuple(blocks), {"groups": groups})


def core_macs(model: torch.nn.Module) -> int:
    return sum(n for op, n in fvcore_macs(model, IMG).items() if op in CORE_OPERATORS)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model(MODEL, img_size=IMG, num_classes=CLASSES, **KWARGS))


@pytest.fixture(scope="module")
def net(dense, tmp_path_factory) -> SReTSupernet:
    """The supernet built by name from the dense model's weights, saved as a checkpoint; its z and BN statistics
    random too."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(dense.state_dict(), str(path))
    net = build_supernet(MODEL, checkpoint_path=path, img_size=IMG, num_classes=CLASSES, **KWARGS)
    gen = torch.Generator().manual_seed(2)
    for block in net.blocks:  # the conv candidates' own parameters, which the dense model has not
        randomize_(block.attn.bn1, seed=2)
        randomize_(block.attn.bn3, seed=3)
        with torch.no_grad():
            block.attn.head_mix_logits.normal_(0.0, 0.02, generator=gen)
    return net


@pytest.fixture(scope="module")
def luts(net) -> dict[str, LookupTable]:
    return {convention: build_lookup_table(net, convention) for convention in ("fvcore", "core")}


# -- the supernet -----------------------------------------------------------------------------------


def test_registry_builds_sret_supernets(net):
    assert {"sret_t", "sret_lt", "sret_s"} <= set(list_supernets())
    check_model_name("sret_s")
    assert isinstance(net, SReTSupernet) and net.model_kwargs == KWARGS
    assert (net.depth, net.block_stages, net.num_prefix_tokens) == (4, [0, 0, 1, 2], 0)
    assert [s.grid_size for s in net.stages] == [(8, 8), (4, 4), (2, 2)]
    assert net.discrete_choices()["groups"][0] == [[1, 2, 4, 8, 16, 32, 64]] * 2
    assert net.no_weight_decay() >= {"pos_embed"}


def test_dense_supernet_is_the_dense_model_at_any_groups(dense, net):
    x = images(2)
    assert net.architecture() == net.dense_architecture()  # the gates start on
    assert net.dense_architecture().groups == DEFAULT_GROUPS
    assert (logits(net, x) - logits(dense, x)).abs().max() <= 1e-5  # sliced, permuted in the recursive passes
    for _, groups in ARCHS:
        net.fix_architecture(net.dense_architecture().with_extras(groups=groups))
        dense.set_groups(groups)
        try:
            assert (logits(net, x) - logits(dense, x)).abs().max() <= 1e-5
        finally:
            net.release_architecture()
            dense.set_groups(DEFAULT_GROUPS)
    assert net.stage_groups() == DEFAULT_GROUPS


def test_search_forward_trains_weights_and_gates():
    net = build_supernet(MODEL, img_size=IMG, num_classes=CLASSES, **KWARGS).train()
    net(images(2)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in net.gate_parameters())
    assert net.blocks[0].residual1.beta.grad is not None and net.stages[0].nlls[3].mlp.fc1.weight.grad is not None


# -- Architecture.groups ----------------------------------------------------------------------------


def test_groups_in_json(net, tiny_supernet, tmp_path):
    arch = architecture(net, *ARCHS[1])
    assert '"num_classes": 10, "groups": [[2, 16], [4, 4], [4, 2]], "blocks"' in arch.to_json()
    arch.save(tmp_path / "arch.json")
    assert Architecture.load(tmp_path / "arch.json") == arch
    vit_arch = tiny_supernet.dense_architecture()
    assert "groups" not in vit_arch.to_json()  # the other families' JSON is as it was
    with pytest.raises(ValueError, match=r"groups: 'test_vit' has no groups choice, but the architecture sets"):
        tiny_supernet.fix_architecture(vit_arch.with_extras(groups=((1,),)))
    for value, message in [
        ("[[2, 16], [4, 0], [4, 2]]", r"groups\[1\]\[1\]: must be positive"),
        ("[[2, 16], [4, true], [4, 2]]", r"groups\[1\]\[1\]: expected int"),
        ("[[2, 16], 4, [4, 2]]", r"groups\[1\]: expected a non-empty list"),
        ("8", r"groups: expected a non-empty list"),
    ]:
        (tmp_path / "bad.json").write_text(arch.to_json().replace("[[2, 16], [4, 4], [4, 2]]", value))
        with pytest.raises(ValueError, match=message):
            Architecture.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (((4, 2), (3, 1), (1, 1)), r"groups\[1\]\[0\]: 'sret_t' offers 1, 2, 4, 8, 16; the architecture has 3"),
        (((4, 2), (2, 1), (1, 8)), r"groups\[2\]\[1\]: 'sret_t' offers 1, 2, 4; the architecture has 8"),
        (((4, 2), (2, 1)), r"groups: 'sret_t' offers 3 entries; the architecture has \[\[4, 2\], \[2, 1\]\]"),
        (((4, 2, 1), (2, 1), (1, 1)), r"groups\[0\]: 'sret_t' offers 2 entries"),
        (None, r"groups: 'sret_t' offers a choice for each of 3 entries; the architecture has none"),
    ],
)
def test_groups_that_do_not_fit_are_clear_errors(net, luts, groups, message):
    arch = net.dense_architecture().with_extras(groups=groups)
    with pytest.raises(ValueError, match=message):
        net.fix_architecture(arch)
    assert net.fixed_architecture is None
    with pytest.raises(ValueError, match=message):
        luts["core"].flops(arch)


# -- export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mixers", "groups"), ARCHS)
def test_exported_subnets_match_the_supernet(net, mixers, groups, tmp_path):
    arch = architecture(net, mixers, groups)
    check_parity(net, arch, images(3), tmp_path)  # exported, saved and loaded, BN folded
    subnet = load_subnet(tmp_path / "plain")
    assert isinstance(subnet, SReTSubnet) and subnet.groups == groups and subnet.arch == arch
    assert subnet.config() == {"family": "sret", "model_kwargs": KWARGS, "fold_bn": False}
    kinds = {"msa": SlicedAttention, "bconv1": BottleneckConv, "bconv3": BottleneckConv, "skip": type(None)}
    assert all(isinstance(b.mixer, kinds[m]) for b, m in zip(subnet.blocks, mixers, strict=True))
    assert timm.data.resolve_model_data_config(subnet)["input_size"] == (3, IMG, IMG)


def test_exported_dense_subnet_is_the_dense_model(dense, net):
    subnet = export_subnet(net, net.dense_architecture())
    assert sum(p.numel() for p in subnet.parameters()) == sum(p.numel() for p in dense.parameters())
    assert (logits(subnet, images(2)) - logits(dense, images(2))).abs().max() <= 1e-5


# -- lookup table -----------------------------------------------------------------------------------


def test_lookup_table_prices_groups_params_range_and_csv(net, luts, tmp_path):
    lut = luts["core"]
    dense = net.dense_architecture()
    unsliced = dense.with_extras(groups=((1, 1),) * 3)
    assert lut.flops(dense) == lut.dense_flops() == core_macs(export_subnet(net, dense))
    assert lut.flops(unsliced) == core_macs(export_subnet(net, unsliced)) > lut.flops(dense)
    assert lut.params(dense) == lut.params(unsliced) == sum(p.numel() for p in export_subnet(net, dense).parameters())
    assert lut.range()[1] == lut.flops(unsliced) > lut.range(full_size=True)[1]  # every pass at G = 1 is dearest
    lut.save(tmp_path / "lut.csv")
    loaded = LookupTable.load(tmp_path / "lut.csv")
    assert loaded.meta["discrete_choices"] == net.discrete_choices() and loaded.to_frame().equals(lut.to_frame())
    arch = architecture(net, *ARCHS[0])
    assert (loaded.flops(arch), loaded.params(arch)) == (lut.flops(arch), lut.params(arch))


def test_gradient_search_prices_the_model_groups(net, luts):
    lut = luts["core"]
    lut.check_supernet(net)
    assert differentiable_flops(net, lut).item() == lut.flops(net.architecture()) == lut.dense_flops()


def test_full_size_sret_t_matches_the_reference():
    """REFERENCE.md: sret_t's params_all and `core` MACs, sliced (its groups) and unsliced (every G = 1)."""
    torch.manual_seed(0)
    net = build_supernet(MODEL)
    lut = build_lookup_table(net, "core")
    dense = net.dense_architecture()
    assert dense.groups == ((8, 2), (4, 1), (1, 1))
    assert [s.grid_size for s in net.stages] == [(28, 28), (14, 14), (7, 7)]
    assert lut.params(dense) == 4_755_979
    assert abs(lut.flops(dense) / 1e9 - 1.112) < 0.005
    assert abs(lut.flops(dense.with_extras(groups=((1, 1),) * 3)) / 1e9 - 1.366) < 0.005


# -- Optuna -----------------------------------------------------------------------------------------


def test_optuna_space_samples_group_splits(net, luts):
    space = discrete_space(net)
    assert isinstance(space, SReTSpace)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        arch = space.suggest(trial)
        net.validate_architecture(arch)
        assert space.architecture(trial.params) == arch and arch.groups[0][1] == trial.params["groups.0.1"]
        assert {f"mixer.{i}" for i in range(4)} <= set(trial.params)
        seen.add(arch.groups)
        luts["core"].flops(arch)
    assert len(seen) == 8


def test_saved_table_fits_a_supernet_built_with_tuple_arguments(tmp_path):
    """JSON reads tuples back as lists: a table saved for heads=(1, 2, 4) still fits that supernet."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in KWARGS.items() if k != "groups"}
    net = build_supernet(MODEL, img_size=IMG, num_classes=CLASSES, **kwargs)
    build_lookup_table(net).save(tmp_path / "lut.csv")
    LookupTable.load(tmp_path / "lut.csv").check_supernet(net)

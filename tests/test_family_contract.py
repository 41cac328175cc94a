"""The contract every registered family keeps, checked on a tiny model of each: the dense supernet computes the
source model; exported subnets compute the supernet with their architecture fixed, before and after save/load and
with BN folded; the lookup table prices them as fvcore counts them; architectures round-trip through JSON; the
Optuna space offers only valid architectures inside the table's range; the ONNX export computes the subnet in
onnxruntime. A new family adds its tiny model here."""

from __future__ import annotations

import copy
import dataclasses

import optuna
import pytest
import torch
from helpers import check_parity, fvcore_macs, randomize_

from lookup_tables import build_lookup_table
from lookup_tables.counting import CORE_OPERATORS
from spvit_search.discrete_spaces import discrete_space
from spvit_search.export import export_onnx, export_subnet
from supernets import MIXERS, Architecture, BlockChoice, registered_families
from supernets.family import family_of, family_of_model
from supernets.registry import create_source_model

# Per family (as its subnets' config.json names it): a tiny model, its image size and timm kwargs.
TINY_MODELS = {
    None: ("test_vit", 16, dict(patch_size=4, embed_dim=16, depth=3, num_heads=2)),
    "cait": ("cait_xxs24_224", 16, dict(patch_size=4, embed_dim=16, depth=2, num_heads=2)),
    "t2t_vit": ("t2t_vit_7", 32, dict(embed_dim=32, depth=2, num_heads=2, token_dim=8)),
    "sret": ("sret_t", 64, dict(base_dim=8, heads=[1, 2, 4], depth=[4, 2, 2], recursive_num=[2, 1, 1])),
    # Two stages of 16x16 and 8x8 tokens in 4x4 windows: every other block shifted.
    "swin": (
        "swin_tiny_patch4_window7_224",
        32,
        dict(patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4),
    ),
}
CLASSES = 10


def test_every_registered_family_has_a_tiny_model():
    assert sorted(map(str, TINY_MODELS)) == sorted(str(f.name) for f in registered_families())


@pytest.fixture(scope="module", params=sorted(TINY_MODELS, key=str), ids=str)
def pair(request):
    """(source model with random weights and BN statistics, the supernet converted from it), in eval mode."""
    name, img_size, kwargs = TINY_MODELS[request.param]
    torch.manual_seed(0)
    source = randomize_(create_source_model(name, img_size=img_size, num_classes=CLASSES, **kwargs), seed=1).eval()
    family = family_of_model(source)
    assert family.name == request.param
    return source, family.supernet_class(source, name, model_kwargs=kwargs).eval()


@pytest.fixture(scope="module")
def net(pair):
    """The supernet with every weight random, its search-only ones (head mixing, bconv BN) included."""
    return randomize_(copy.deepcopy(pair[1]), seed=2).eval()


def images(net, n: int) -> torch.Tensor:
    return torch.randn(n, net.in_chans, net.img_size, net.img_size, generator=torch.Generator().manual_seed(3))


def space_architectures(net, count: int) -> list[Architecture]:
    """`count` architectures of the family's Optuna space, drawn at random (its own choices included)."""
    space = discrete_space(net, mlp_ratios=(0.0, 0.5, 1.0))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    archs = []
    for _ in range(count):
        trial = study.ask()
        archs.append(space.suggest(trial))
        assert space.architecture(trial.params) == archs[-1]  # a study's parameters rebuild its architecture
        study.tell(trial, 0.0)
    return archs


def every_mixer(arch: Architecture) -> Architecture:
    """`arch` with its blocks' mixers cycling through every mixer, and every other hidden unit kept."""
    blocks = [
        BlockChoice(MIXERS[i % len(MIXERS)], tuple(b.mlp_kept[::2])) for i, b in enumerate(arch.blocks)
    ]  # fmt: skip
    return dataclasses.replace(arch, blocks=tuple(blocks))


def test_dense_supernet_is_the_source_model(pair):
    source, net = pair
    assert net.architecture() == net.dense_architecture()
    with torch.no_grad():
        torch.testing.assert_close(net(images(net, 2)), source(images(net, 2)), rtol=1e-5, atol=1e-5)


def test_exported_subnets_compute_the_supernet(net, tmp_path):
    for i, arch in enumerate([every_mixer(net.dense_architecture()), *space_architectures(net, 2)]):
        check_parity(net, arch, images(net, 2), tmp_path / str(i))


def test_the_onnx_export_computes_the_subnet_in_onnxruntime(net, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # in the dev extra: `make test` runs this
    subnet = export_subnet(net, every_mixer(net.dense_architecture()))
    export_onnx(subnet, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = images(net, 3)  # a batch size the export did not trace: the batch dimension is dynamic
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = subnet(x)
    assert (torch.from_numpy(logits) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("convention", ["fvcore", "core"])
def test_lookup_table_is_fvcore_count_of_the_subnet(net, convention):
    lut = build_lookup_table(net, convention)
    low, high = lut.range()
    for arch in [net.dense_architecture(), every_mixer(net.dense_architecture()), *space_architectures(net, 2)]:
        counts = fvcore_macs(export_subnet(net, arch), net.img_size)
        measured = sum(n for op, n in counts.items() if convention == "fvcore" or op in CORE_OPERATORS)
        assert lut.flops(arch) == pytest.approx(measured, rel=1e-3)
        assert low <= lut.flops(arch) <= high


def test_architectures_round_trip_through_json(net, tmp_path):
    for i, arch in enumerate(space_architectures(net, 3)):
        assert Architecture.from_json(arch.to_json()) == arch
        arch.save(tmp_path / f"{i}.json")
        loaded = Architecture.load(tmp_path / f"{i}.json")
        assert loaded == arch and loaded.extras == arch.extras
        net.validate_architecture(loaded)


def test_optuna_space_stays_inside_the_family_and_its_costs(net):
    lut = build_lookup_table(net, "fvcore")
    low, high = lut.range()
    archs = space_architectures(net, 8)
    for arch in archs:
        net.validate_architecture(arch)
        assert low <= lut.flops(arch) <= high
        assert set(arch.extras) <= set(family_of(net).architecture_fields)
    assert len({a.to_json() for a in archs}) > 1

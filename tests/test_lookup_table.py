"""The lookup table reproduces published MACs and params, and fvcore's count of real subnets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from helpers import TINY, random_architecture

from lookup_tables import LookupTable, build_lookup_table
from supernets import Architecture, BlockChoice, build_supernet

RELEASED = Path(__file__).resolve().parent / "data" / "spvit_released_archs.json"  # from ../shared/reference


def fvcore_macs(net: torch.nn.Module, arch: Architecture, operators: set[str] | None = None) -> int:
    """fvcore's own count of `net` with `arch` fixed, plus SDPA's two matmuls (which fvcore skips)."""

    def sdpa(inputs, outputs):
        q, k, v = (i.type().sizes() for i in inputs[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])

    net.eval().fix_architecture(arch)
    analysis = FlopCountAnalysis(net, torch.zeros(1, 3, net.img_size, net.img_size))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    counts = analysis.by_operator()
    net.release_architecture()
    return sum(n for op, n in counts.items() if operators is None or op in operators)


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return build_supernet("deit_tiny_patch16_224")


@pytest.mark.parametrize(
    ("name", "gmacs"),
    [("deit_tiny_patch16_224", 1.251), ("deit_small_patch16_224", 4.587), ("deit_base_patch16_224", 17.511)],
)
def test_spvit_convention_dense_matches_the_paper(name, gmacs):
    with torch.device("meta"):
        net = build_supernet(name)
    lut = build_lookup_table(net, "spvit")
    assert abs(lut.dense_flops() / 1e9 - gmacs) <= 0.001
    assert lut.flops(net.dense_architecture()) == lut.dense_flops() == lut.range()[1]


@pytest.mark.parametrize(
    ("released", "gmacs", "mparams"), [("deit_tiny_l200_t10", 1.037, 4.87), ("deit_base_l008_t60", 8.391, 46.21)]
)
def test_spvit_convention_released_architectures(released, gmacs, mparams):
    entry = json.loads(RELEASED.read_text())[released]
    blocks = tuple(BlockChoice(m, tuple(k)) for m, k in zip(entry["mixers"], entry["mlp_kept"], strict=True))
    arch = Architecture(entry["model"], 224, 1000, blocks)
    with torch.device("meta"):
        lut = build_lookup_table(build_supernet(entry["model"]), "spvit")
    assert abs(lut.flops(arch) / 1e9 - gmacs) <= 0.001
    assert abs(lut.params(arch) / 1e6 - mparams) <= 0.01


def test_fvcore_convention_matches_fvcore_on_fixed_subnets(deit_tiny):
    lut = build_lookup_table(deit_tiny, "fvcore")
    archs = [deit_tiny.dense_architecture()] + [
        random_architecture(depth=12, hidden=768, seed=s, model="deit_tiny_patch16_224", img_size=224, num_classes=1000)
        for s in range(3)
    ]
    for arch in archs:
        measured = fvcore_macs(deit_tiny, arch)
        assert abs(lut.flops(arch) - measured) <= 0.001 * measured


def test_range_is_the_cheapest_and_the_dense_subnet(deit_tiny):
    lut = build_lookup_table(deit_tiny, "fvcore")
    smallest = Architecture("deit_tiny_patch16_224", 224, 1000, tuple(BlockChoice("skip", ()) for _ in range(12)))
    assert lut.range() == (fvcore_macs(deit_tiny, smallest), fvcore_macs(deit_tiny, deit_tiny.dense_architecture()))


def test_deit_base_fvcore_dense_and_its_mlps():
    torch.manual_seed(0)
    net = build_supernet("deit_base_patch16_224")
    lut = build_lookup_table(net, "fvcore")
    assert abs(lut.dense_flops() / 1e9 - 17.58) <= 0.005
    assert abs((lut.mlp_unit_macs * lut.mlp_hidden).sum() / 1e9 - 11.15) <= 0.005
    core = build_lookup_table(net, "core")
    matrix_ops = {"linear", "conv", "scaled_dot_product_attention"}
    assert core.dense_flops() == fvcore_macs(net, net.dense_architecture(), matrix_ops)


def test_params_count_the_real_modules(tiny_supernet):
    """Each choice counts the parameters it uses; named by hand here from the modules' names."""
    lut = build_lookup_table(tiny_supernet, "fvcore")
    sizes = {n: p.numel() for n, p in tiny_supernet.named_parameters() if not n.endswith("gates.logits")}

    def without(*patterns: str) -> int:
        return sum(n for name, n in sizes.items() if not any(p in name for p in patterns))

    assert lut.params(tiny_supernet.dense_architecture()) == without("head_mix_logits", ".bn1.", ".bn3.")
    all_bconv3 = Architecture("test_vit", 32, 10, tuple(BlockChoice("bconv3", tuple(range(192))) for _ in range(6)))
    assert lut.params(all_bconv3) == without(".qk.", ".bn1.")
    smallest = Architecture("test_vit", 32, 10, tuple(BlockChoice("skip", ()) for _ in range(6)))
    unit_free = ("norm1", ".attn.", "fc1.", "fc2.weight")
    assert lut.params(smallest) == without(*unit_free)
    half = Architecture("test_vit", 32, 10, tuple(BlockChoice("skip", tuple(range(96))) for _ in range(6)))
    assert lut.params(half) == without(*unit_free) + 6 * 96 * (64 + 1 + 64)


def test_csv_round_trip_keeps_data_and_metadata(tmp_path, tiny_supernet):
    lut = build_lookup_table(tiny_supernet, "core")
    lut.save(tmp_path / "lut.csv")
    loaded = LookupTable.load(tmp_path / "lut.csv")
    assert (
        loaded.meta
        == lut.meta
        == {
            "model": "test_vit",
            "img_size": 32,
            "num_classes": 10,
            "model_kwargs": {"patch_size": 4},
            "convention": "core",
        }
    )
    assert loaded.to_frame().equals(lut.to_frame())
    arch = random_architecture(seed=4)
    assert loaded.flops(arch) == lut.flops(arch) and loaded.params(arch) == lut.params(arch)


def test_table_for_another_model_or_size_is_refused(tiny_supernet):
    lut = build_lookup_table(tiny_supernet, "spvit")
    other_size = build_supernet("test_vit", img_size=64, patch_size=4, num_classes=10)
    with pytest.raises(ValueError, match=r"lookup table is for test_vit .* at img_size 32.*img_size=64"):
        lut.check_supernet(other_size)
    with pytest.raises(ValueError, match=r"img_size=64"):
        lut.flops(other_size.dense_architecture())
    other_patch = build_supernet("test_vit", **(TINY | {"patch_size": 8}))
    with pytest.raises(ValueError, match=r"model_kwargs=\{'patch_size': 8\}"):
        lut.check_supernet(other_patch)
    with pytest.raises(ValueError, match=r"model=.*deit_tiny"):
        lut.flops(random_architecture(depth=12, hidden=768, model="deit_tiny_patch16_224"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("block,item\n-1,fixed\n", "not a valid lookup table"),
        ('# {"format": "spvit-search lookup table", "version": 99}\n', "format version 99"),
        (
            '# {"format": "spvit-search lookup table", "version": 1, "model": "x", "img_size": 1, "num_classes": 1, '
            '"model_kwargs": {}, "convention": "fvcore"}\nblock,item\n',
            "missing columns",
        ),
    ],
)
def test_corrupt_table_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "lut.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        LookupTable.load(path)

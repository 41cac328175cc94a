"""What is specific to the Swin family: timm's Swin-T as a dense supernet, window attention with its shift mask, the
bconv candidates on the whole map, SPViT's Swin cost formula and its released Swin-Ti, and a search end to end.
(The contract every family keeps is checked on a tiny Swin in test_family_contract.py.)"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import fvcore_macs, randomize_, reference_bconv
from safetensors.torch import save_file

from lookup_tables import LookupTable, build_lookup_table
from spvit_search.cli import main
from spvit_search.export import export_subnet, load_subnet, read_released_architectures
from supernets import Architecture, BlockChoice, build_supernet
from supernets.families.swin.subnet import ShiftedWindowAttention
from supernets.families.swin.supernet import SwinSupernet, shift_mask
from supernets.family import family_of_model_name
from supernets.layers.plain import BottleneckConv
from supernets.registry import check_model_name

SWIN_T = "swin_tiny_patch4_window7_224"
RELEASED = Path(__file__).resolve().parent / "data" / "spvit_swin_released_archs.json"  # from ../shared/reference
TINY = dict(patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4)


def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, SwinSupernet]:
    """(a tiny timm Swin at 32 px, two stages of 16x16 and 8x8 tokens in 4x4 windows, its supernet), eval mode."""
    torch.manual_seed(seed)
    source = randomize_(timm.create_model(SWIN_T, img_size=32, num_classes=10, **TINY), seed=seed + 1).eval()
    return source, SwinSupernet(source, SWIN_T, model_kwargs=TINY).eval()


def test_swin_models_are_supernets():
    for name in (SWIN_T, "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
                 "swin_base_patch4_window12_384", "swin_large_patch4_window12_384"):  # fmt: skip
        check_model_name(name)  # builds its structure and raises if it cannot be searched
        assert family_of_model_name(name).name == "swin"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dense_supernet_is_timm_swin_tiny_at_224(mode):
    torch.manual_seed(0)
    source = timm.create_model(SWIN_T, drop_path_rate=0.1).train(mode == "train")
    net = build_supernet(SWIN_T)
    net.load_state_dict(SwinSupernet(source, SWIN_T).state_dict())
    net.train(mode == "train").fix_architecture(net.dense_architecture())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.manual_seed(1)  # the same stochastic-depth draws, in the same order
        expected = source(x)
        torch.manual_seed(1)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_tiny_dense_supernet_is_the_source_in_train_mode():
    source, net = tiny_pair()
    source.train()
    net.train().fix_architecture(net.dense_architecture())
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(2)
    expected = source(x)
    torch.manual_seed(2)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_shift_mask_is_timm_mask_and_shifted_blocks_alternate():
    source, net = tiny_pair()
    blocks = [b for stage in source.layers for b in stage.blocks]
    assert [b.shift_size for b in blocks] == [(0, 0), (2, 2), (0, 0), (2, 2)]
    for timm_block, block in zip(blocks, net.blocks, strict=True):
        if timm_block.attn_mask is None:
            assert block.attn.attn_mask is None
        else:
            torch.testing.assert_close(block.attn.attn_mask, timm_block.attn_mask, rtol=0, atol=0)
    assert shift_mask((8, 8), (4, 4), (0, 0)) is None


@pytest.mark.parametrize("block", [0, 1, 3])  # unshifted and shifted, both stages
def test_bconv3_runs_on_the_whole_map_as_a_hand_built_conv(block):
    _, net = tiny_pair()
    attn = randomize_(copy.deepcopy(net.blocks[block].attn), seed=5).eval()
    attn.fixed_mixer = "bconv3"
    gh, gw = attn.grid_size
    x = torch.randn(2, gh * gw, attn.v.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_bconv(attn, x, 3, batch_stats=False), rtol=1e-5, atol=1e-5)
        # Not windowed: a token's update depends on its neighbour across a window border.
        nudged = x.clone()
        nudged[:, 4] += 1.0  # (0, 4): the first token of the second window in the first row
        assert not torch.equal(attn(nudged)[:, 3], attn(x)[:, 3])


def test_exported_blocks_are_timm_window_attention_and_full_map_convs():
    _, net = tiny_pair()
    dense = net.dense_architecture()
    mixers = ["msa", "msa", "bconv3", "skip"]
    blocks = tuple(BlockChoice(m, b.mlp_kept) for m, b in zip(mixers, dense.blocks, strict=True))
    arch = dataclasses.replace(dense, blocks=blocks)
    subnet = export_subnet(net, arch, fold_bn=True)
    shifted = subnet.blocks[1].mixer
    assert isinstance(shifted, ShiftedWindowAttention) and shifted.shift_size == (2, 2)
    conv = subnet.blocks[2].mixer
    assert isinstance(conv, BottleneckConv) and isinstance(conv.conv, torch.nn.Conv2d)
    assert conv.grid_size == (8, 8) and conv.conv.weight.shape == (8, 16, 3, 3)  # (dh, C, 3, 3): 2 heads of 8
    assert subnet.blocks[3].mixer is None


# SPViT's Swin flops() and the parameters as searched, and fvcore's count of timm's model.
@pytest.mark.parametrize(
    "name, gmacs, mparams",
    [(SWIN_T, 4.494, 28.288), ("swin_small_patch4_window7_224", 8.747, 49.606),
     ("swin_base_patch4_window7_224", 15.438, 87.768)],
)  # fmt: skip
def test_spvit_convention_reproduces_the_published_dense_counts(name, gmacs, mparams):
    net = build_supernet(name)
    lut = build_lookup_table(net, "spvit")
    dense = net.dense_architecture()
    assert lut.flops(dense) / 1e9 == pytest.approx(gmacs, abs=1e-3)
    assert lut.params(dense) / 1e6 == pytest.approx(mparams, abs=1e-2)


@pytest.fixture(scope="module")
def released():
    arch = read_released_architectures(RELEASED)["spvit_swin_tn_l28_t32"]
    return arch, build_supernet(arch.model)


def test_released_spvit_swin_ti_has_its_published_counts(released):
    arch, net = released
    assert list(arch.mixers[:4]) == ["bconv1", "skip", "bconv1", "skip"] and len(arch.blocks[0].mlp_kept) == 186
    lut = build_lookup_table(net, "spvit")
    assert lut.flops(arch) / 1e9 == pytest.approx(3.334, abs=1e-3)
    assert lut.params(arch) / 1e6 == pytest.approx(26.306, abs=1e-2)
    folded = export_subnet(net, arch, fold_bn=True)
    assert sum(p.numel() for p in folded.parameters()) / 1e6 == pytest.approx(26.232, abs=1e-2)


def test_fvcore_convention_is_fvcore_count_of_timm_and_of_the_released_subnet(released):
    arch, net = released
    lut = build_lookup_table(net, "fvcore")
    timm_macs = sum(fvcore_macs(timm.create_model(SWIN_T), 224).values())
    assert timm_macs / 1e9 == pytest.approx(4.509, abs=1e-3)  # LayerNorm at 5 per element
    assert lut.flops(net.dense_architecture()) == pytest.approx(timm_macs, rel=1e-3)
    subnet_macs = sum(fvcore_macs(export_subnet(net, arch), 224).values())
    assert lut.flops(arch) == pytest.approx(subnet_macs, rel=1e-3)


def test_search_export_finetune_and_report_end_to_end(tmp_path, capsys):
    kwargs = ["--model-kwargs", *(f"{k}={v}" for k, v in TINY.items())]
    model = ["--model", SWIN_T, "--img-size", "32", *kwargs, "--no-progress"]
    run, subnet, tuned = tmp_path / "search", tmp_path / "subnet", tmp_path / "finetune"
    assert main(["search", *model, "--out", str(run), "--target", "0.6x", "--epochs", "1", "--gate-lr", "0.1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    lut = LookupTable.load(run / "lut.csv")
    target = 0.6 * lut.dense_flops()
    arch = Architecture.load(run / "arch.json")
    assert 0.99 * target <= lut.flops(arch) == summary["macs"] <= target  # on the budget, from below
    assert main(["export", "--run", str(run), "--out", str(subnet)]) == 0
    loaded, through_timm = load_subnet(subnet), timm.create_model("spvit_subnet", subnet_dir=subnet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded.arch == arch and torch.equal(loaded(x), through_timm(x))
    assert main(["finetune", "--subnet", str(subnet), "--out", str(tuned), "--epochs", "1", "--no-progress"]) == 0
    steps = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r for r in steps)  # distilled from the dense Swin the subnet came from
    assert main(["report", str(run), str(tuned), "--out", str(tmp_path / "report")]) == 0
    assert "spvit: error" not in capsys.readouterr().err


def test_checkpoint_for_another_class_count_keeps_its_backbone(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(SWIN_T, img_size=32, num_classes=1000, **TINY)
    save_file(source.state_dict(), str(tmp_path / "swin.safetensors"))
    with pytest.warns(UserWarning, match="another number of classes"):
        net = build_supernet(SWIN_T, checkpoint_path=tmp_path / "swin.safetensors", img_size=32, num_classes=10, **TINY)
    assert net.head.fc.out_features == 10
    torch.testing.assert_close(net.blocks[3].attn.v.weight, source.layers[1].blocks[1].attn.qkv.weight[32:])

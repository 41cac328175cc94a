"""The CaiT supernet: timm's `cait_*` with unified MSA and gated MLPs in its talking-heads blocks. Dense, it is
timm's model; its exported subnets (LayerScale folded) compute what it computes and cost what the lookup table
says; the full-size cait_xxs24_224 has timm's published size."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import check_parity, every_mixer_architecture, random_architecture, randomize_
from safetensors.torch import save_file

from lookup_tables import build_lookup_table
from spvit_search.export import TIMM_NAME, export_subnet, load_search_supernet, load_subnet, save_subnet
from spvit_search.search import SearchConfig, run_search
from supernets import Architecture, CaitSubnet, CaitSupernet, build_supernet, check_model_name, list_supernets
from supernets.families.cait.supernet import CaitSuperBlock

MODEL = "cait_xxs24_224"
# An 8×8 token grid, 4 heads of 16 channels, 4 talking-heads blocks and timm's 2 class-attention blocks.
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
TINY_KWARGS = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}  # a supernet's model_kwargs
TINY_ARCH = dict(model=MODEL, img_size=32, num_classes=10)
HIDDEN = 256


def timm_cait(seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's CaiT with random non-trivial weights: no bias, norm or layer scale is at its initial value."""
    torch.manual_seed(seed)
    return randomize_(timm.create_model(MODEL, **kwargs), seed=seed, scale=0.02)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny timm CaiT, and the supernet built by name from its weights saved as a timm checkpoint."""
    source = timm_cait(**TINY)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(source.state_dict(), str(path))
    return source, build_supernet(MODEL, checkpoint_path=path, **TINY)


@pytest.fixture
def net():
    """A tiny CaiT supernet whose every weight, z and BN statistic is random."""
    torch.manual_seed(0)
    return randomize_(build_supernet(MODEL, **TINY), seed=1)


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- the supernet -----------------------------------------------------------------------------------


def test_cait_names_are_supernets():
    names = list_supernets()
    for name in ("cait_xxs24_224", "cait_xxs36_384", "cait_s24_224", "cait_m48_448"):
        assert name in names
        check_model_name(name)
    with torch.device("meta"):
        net = build_supernet(MODEL)
    assert isinstance(net, CaitSupernet) and all(isinstance(b, CaitSuperBlock) for b in net.blocks)
    assert (net.depth, net.grid_size, net.num_prefix_tokens, net.mlp_hidden) == (24, (14, 14), 0, [768] * 24)
    assert len(net.blocks_token_only) == 2  # the class-attention blocks stay timm's


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dense_architecture_equals_timm(pair, mode):
    source, net = pair
    net.fix_architecture(net.dense_architecture())
    source.train(mode == "train")
    net.train(mode == "train")
    with torch.no_grad():
        diff = (source(images(2)) - net(images(2))).abs().max().item()
    net.release_architecture()
    assert diff <= 1e-5


def test_checkpoint_at_another_image_size_resamples_position_embeddings(pair, tmp_path):
    source, _ = pair
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    net = build_supernet(MODEL, checkpoint_path=tmp_path / "model.safetensors", **(TINY | {"img_size": 64}))
    assert net.grid_size == (16, 16) and net.pos_embed.shape == (1, 256, 64)  # patch tokens only, no class token
    assert net(images(1, 64)).shape == (1, 10)


def test_search_forward_trains_weights_and_gates(net):
    net.train()
    net(images(2)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in net.gate_parameters())
    assert net.blocks[0].ls1.gamma.grad is not None  # LayerScale trains during search


def test_spvit_convention_is_refused(net):
    with pytest.raises(ValueError, match="no form for 'cait_xxs24_224'; price it with fvcore or core"):
        build_lookup_table(net, "spvit")


# -- export -----------------------------------------------------------------------------------------


def test_layer_scale_is_folded_into_the_projections(net):
    arch = every_mixer_architecture(0, depth=4, hidden=HIDDEN, **TINY_ARCH)
    subnet = export_subnet(net, arch)
    state = subnet.state_dict()
    assert not any("gamma" in k or ".ls" in k for k in state if k.startswith("blocks."))
    for i, (block, choice) in enumerate(zip(net.blocks, arch.blocks, strict=True)):
        mlp_gamma = block.ls2.gamma.detach()
        torch.testing.assert_close(state[f"blocks.{i}.mlp.fc2.bias"], block.mlp.fc2.bias.detach() * mlp_gamma)
        if choice.mixer == "msa":
            proj = block.attn.proj.weight.detach() * block.ls1.gamma.detach()[:, None]
            torch.testing.assert_close(state[f"blocks.{i}.mixer.proj.weight"], proj)


def test_saved_subnet_records_its_family(net, tmp_path):
    arch = random_architecture(depth=4, hidden=HIDDEN, seed=3, **TINY_ARCH)
    save_subnet(export_subnet(net, arch), tmp_path / "subnet")
    config = json.loads((tmp_path / "subnet" / "config.json").read_text())
    assert config["model_args"]["family"] == "cait" and config["model_args"]["model_kwargs"] == TINY_KWARGS
    loaded = timm.create_model(TIMM_NAME, subnet_dir=tmp_path / "subnet")
    assert isinstance(loaded, CaitSubnet) and loaded.arch == arch
    config["model_args"]["family"] = "pit"
    (tmp_path / "subnet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"subnet: family: unknown subnet family 'pit'; expected 'cait'"):
        load_subnet(tmp_path / "subnet")


# -- cost -------------------------------------------------------------------------------------------


def test_full_size_cait_xxs24_is_timm_and_has_the_published_size():
    source = timm_cait()
    net = CaitSupernet(source, MODEL)  # converted directly: `pair` covers building from a checkpoint by name
    params = sum(p.numel() for p in source.parameters())
    assert params == 11_956_264
    x = images(1, 224)
    with torch.no_grad():
        logits = net.eval()(x)
        assert (source.eval()(x) - logits).abs().max() <= 1e-5
        subnet = export_subnet(net, net.dense_architecture())
        assert (subnet(x) - logits).abs().max() <= 1e-4
    assert sum(p.numel() for p in subnet.parameters()) == params - 2 * 24 * 192  # the folded layer scales
    lut = build_lookup_table(net, "fvcore")
    assert lut.params(net.dense_architecture()) == params
    assert round(lut.dense_flops() / 1e9, 2) == 2.53  # timm's figure, from fvcore


# -- search -----------------------------------------------------------------------------------------


def test_search_and_export(tmp_path):
    """The search loop, its lookup table and projection, and the exporter take a CaiT as they take a ViT."""
    kwargs = TINY_KWARGS | {"depth": 2}  # on a 4×4 grid: one epoch of digits in seconds
    run = dict(out=str(tmp_path / "run"), epochs=1, progress=False)
    summary = run_search(SearchConfig(model=MODEL, img_size=16, model_kwargs=kwargs, target="0.6x", **run))
    net = load_search_supernet(tmp_path / "run" / "supernet.safetensors")
    arch = Architecture.load(tmp_path / "run" / "arch.json")
    assert isinstance(net, CaitSupernet) and summary["macs"] <= 0.6 * summary["dense_macs"]
    check_parity(net, arch, images(2, 16), tmp_path / "subnet")

"""The ViT supernet computes exactly what timm computes when its architecture is dense."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_
from safetensors.torch import save_file

from supernets import build_supernet

# name, timm kwargs, input size: DeiT-Ti at full size, and tiny variants that cover layer scale,
# position embeddings without the class token, register tokens and average pooling.
MODELS = {
    "deit_tiny_224": ("deit_tiny_patch16_224", {}, 224),
    "test_vit_32": ("test_vit", {"img_size": 32, "patch_size": 4}, 32),
    "deit3_layerscale": (
        "deit3_small_patch16_224",
        {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        32,
    ),
    "registers_avgpool": (
        "vit_base_patch16_reg4_gap_256",
        {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4},
        32,
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """A timm model with random non-trivial weights, and the supernet built from its checkpoint."""
    name, kwargs, size = MODELS[request.param]
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=10, **kwargs)
    randomize_(source, seed=0, scale=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(source.state_dict(), str(path))
    net = build_supernet(name, checkpoint_path=path, num_classes=10, **kwargs)
    return source, net, size


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dense_architecture_equals_timm(pair, mode):
    source, net, size = pair
    net.fix_architecture(net.dense_architecture())
    source.train(mode == "train")
    net.train(mode == "train")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (source(x) - net(x)).abs().max().item()
    net.release_architecture()
    assert diff <= 1e-5


def test_deit_family_sizes_build_with_expected_shapes():
    for name, (dim, heads) in {"deit_small_patch16_224": (384, 6), "deit_base_patch16_224": (768, 12)}.items():
        with torch.device("meta"):
            net = build_supernet(name)
        assert (net.embed_dim, net.depth, net.grid_size) == (dim, 12, (14, 14))
        assert net.blocks[0].attn.num_heads == heads and net.mlp_hidden == [4 * dim] * 12
        assert net.dense_architecture().img_size == 224 and net.num_classes == 1000


def test_wrong_image_size_is_a_clear_error(tiny_supernet):
    with pytest.raises(ValueError, match=r"takes 32x32 images, got 48x48"):
        tiny_supernet(torch.randn(1, 3, 48, 48))

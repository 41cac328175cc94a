"""T2T-ViT (Tokens-to-Token ViT): published counts at full size, behaviour on tiny models."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import randomize_
from timm.models.vision_transformer import Block

from lookup_tables.counting import count_macs
from supernets.families.t2t_vit.t2t_vit import (
    PerformerTokenLayer,
    T2TViT,
    TokenAttention,
    TokensToToken,
    sinusoid_position_table,
    t2t_vit_variants,
)

# 2×2 patch tokens at img 32; token_dim 16 gives the Performer 8 random features.
TINY_T2T = dict(img_size=32, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16)
TOKEN_LAYERS = ["performer", "transformer"]
FULL_INPUT = torch.zeros(1, 3, 224, 224)


def tiny_t2t(token_layer: str = "performer", seed: int = 0, **overrides) -> T2TViT:
    torch.manual_seed(seed)
    return randomize_(T2TViT(**{**TINY_T2T, "token_layer": token_layer, **overrides}), seed)


def num_params(model: torch.nn.Module) -> int:
    """params_all: every parameter, the frozen position table and random features included."""
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> T2TViT:
    """The structure alone, without allocating weights; fvcore can trace it all the same."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def core_gmacs(model: torch.nn.Module) -> float:
    image = FULL_INPUT.to(next(model.parameters()).device)
    return count_macs(model, image, convention="core") / 1e9


def test_variants_are_registered_with_timm():
    assert set(t2t_vit_variants()) <= set(timm.list_models("t2t_vit*"))
    assert len(t2t_vit_variants()) == 9


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    [("t2t_vit_7", 4_310_222, 1.147), ("t2t_vit_14", 21_545_550, 4.783), ("t2t_vit_t_14", 21_541_070, 6.089)],
)
def test_published_counts(name, params, gmacs):
    """REFERENCE.md: params_all and `core` MACs (linear weights, attention matmuls, Performer products)."""
    model = meta_model(name)
    assert num_params(model) == params
    assert abs(core_gmacs(model) - gmacs) < 0.005


def test_meta_device_counts_equal_real_counts():
    torch.manual_seed(0)
    real = timm.create_model("t2t_vit_7").eval()
    assert core_gmacs(real) == core_gmacs(meta_model("t2t_vit_7"))


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    [
        ("t2t_vit_10", 5_889_230, 1.5),
        ("t2t_vit_12", 6_941_902, 1.8),
        ("t2t_vit_19", 39_177_422, 8.5),
        # The paper prints 13.8G; its own T2T-ViT_t-24 (15.0G) less the 1.3G the transformer T2T layers
        # add over the Performer ones (6.1G − 4.8G at depth 14) gives 13.7G, which is what we count.
        ("t2t_vit_24", 64_105_934, 13.7),
        ("t2t_vit_t_19", 39_172_942, 9.8),
        ("t2t_vit_t_24", 64_101_454, 15.0),
    ],
)
def test_other_variants_build_and_count(name, params, gmacs):
    """Parameters as measured (paper: 5.9M, 6.9M, 39.2M, 64.1M); MACs rounded as the paper rounds them."""
    model = meta_model(name)
    assert num_params(model) == params
    assert round(core_gmacs(model), 1) == gmacs


def test_variants_only_differ_in_their_arguments():
    variants = t2t_vit_variants()
    assert variants["t2t_vit_t_14"] == {**variants["t2t_vit_14"], "token_layer": "transformer"}
    model = meta_model("t2t_vit_19")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (448, 19, 7)
    assert model.blocks[0].mlp.fc1.out_features == 3 * 448
    assert isinstance(meta_model("t2t_vit_t_19").tokens_to_token.attention1.attn, TokenAttention)


def test_image_size_sets_the_token_grid():
    for img_size, grid in [(32, 2), (48, 3), (224, 14), (384, 24)]:
        model = meta_model("t2t_vit_7", img_size=img_size, num_classes=7)
        assert model.tokens_to_token.grid_size == (grid, grid)
        assert model.pos_embed.shape == (1, grid * grid + 1, 256)
    assert model.head.out_features == 7 and model.num_classes == 7


def test_blocks_are_timm_blocks_with_the_original_settings():
    """The ViT supernet code reads norm1, attn.qkv, attn.proj, norm2, mlp.fc1 and mlp.fc2."""
    model = meta_model("t2t_vit_14", drop_path_rate=0.1)
    assert all(type(block) is Block for block in model.blocks)
    block = model.blocks[-1]
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert block.attn.scale == 64**-0.5  # head_dim^-0.5, as the original when trained from scratch
    assert block.norm1.eps == 1e-5 and model.norm.eps == 1e-5
    assert block.drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert model.num_prefix_tokens == 1 and model.cls_token.shape == (1, 1, 384)


def test_pretrained_is_a_clear_error():
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("t2t_vit_7", pretrained=True)


def test_unknown_token_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="token_layer"):
        T2TViT(**TINY_T2T, token_layer="convolution")


def test_position_table_is_the_interleaved_sinusoid():
    num_positions, dim = 5, 6
    table = sinusoid_position_table(num_positions, dim)
    assert table.shape == (1, num_positions, dim) and table.dtype == torch.float32
    for pos in range(num_positions):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[0, pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[0, pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_frozen_parameters_are_saved_and_restored():
    model = tiny_t2t()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "pos_embed",
        "tokens_to_token.attention1.random_features",
        "tokens_to_token.attention2.random_features",
    }
    assert frozen <= set(model.state_dict())
    features = model.tokens_to_token.attention1.random_features
    assert features.shape == (8, 16)  # m = token_dim / 2 features of width token_dim

    other = T2TViT(**TINY_T2T)  # another draw of the random features
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(other.eval()(x), model.eval()(x), atol=1e-4)
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(x), model(x))


def test_random_features_are_scaled_orthogonal_rows():
    torch.manual_seed(0)
    features = PerformerTokenLayer(in_dim=147, dim=64).random_features  # the published 32 × 64
    assert features.shape == (32, 64)
    assert torch.allclose(features @ features.T, 32 * torch.eye(32), atol=1e-4)


@pytest.mark.parametrize("token_layer", TOKEN_LAYERS)
def test_tiny_forward_backward(token_layer):
    model = tiny_t2t(token_layer).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert trainable and not missing
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.forward_features(x).shape == (2, 5, 32)  # class token + 2×2 patch tokens
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}


@pytest.mark.parametrize("token_layer", TOKEN_LAYERS)
def test_eval_is_deterministic(token_layer):
    model = tiny_t2t(token_layer).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        torch.manual_seed(123)
        second = model(x)
    assert torch.equal(first, second)


def test_reset_classifier():
    model = tiny_t2t()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0, global_pool="token")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size 32"):
        tiny_t2t()(torch.randn(1, 3, 64, 64))


def reference_performer(layer: PerformerTokenLayer, x: torch.Tensor) -> torch.Tensor:
    """The same kernel attention with the N×N matrix spelt out: A = φ(Q)·φ(K)ᵀ, rows normalised."""
    h = layer.norm1(x)
    k, q, v = layer.kqv(h).split(layer.dim, dim=-1)
    w, m = layer.random_features, layer.random_features.shape[0]

    def phi(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(t @ w.T - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, N, N)
    y = v + layer.proj((kernel @ v) / (kernel.sum(-1, keepdim=True) + layer.EPS))
    return y + layer.mlp(layer.norm2(y))


def test_performer_layer_equals_explicit_kernel_attention():
    torch.manual_seed(0)
    layer = randomize_(PerformerTokenLayer(in_dim=12, dim=8)).eval()
    x = torch.randn(2, 10, 12)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 10, 8)
        assert torch.allclose(out, reference_performer(layer, x), atol=1e-5)


def test_token_attention_equals_single_head_softmax_attention():
    torch.manual_seed(0)
    attn = randomize_(TokenAttention(in_dim=12, dim=8))
    x = torch.randn(2, 10, 12)
    q, k, v = (x @ w.T for w in attn.qkv.weight.split(8))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(12), dim=-1)  # scaled by the input width
    expected = v + (weights @ v) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_soft_splits_keep_the_raster_order():
    """With identity T2T layers, the module is three unfolds and a projection; check one output token by hand."""
    torch.manual_seed(0)
    t2t = TokensToToken(img_size=32, in_chans=1, embed_dim=4, token_dim=49)
    t2t.attention1 = torch.nn.Identity()  # 1·7·7 = 49 = token_dim, so the widths still fit
    t2t.attention2 = torch.nn.Sequential(torch.nn.Linear(49 * 9, 49, bias=False))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        out = t2t(x)  # (1, 4, 4)
        # Rebuild by hand: 7×7 windows (stride 4, pad 2) on an 8×8 grid, then 3×3 (stride 2, pad 1) twice.
        padded = torch.nn.functional.pad(x[0, 0], (2, 2, 2, 2))
        grid0 = torch.stack(
            [torch.stack([padded[4 * i : 4 * i + 7, 4 * j : 4 * j + 7].flatten() for j in range(8)]) for i in range(8)]
        )  # (8, 8, 49)

        def split3(grid: torch.Tensor) -> torch.Tensor:  # (S, S, C) -> (S/2, S/2, C·9), channel-major like Unfold
            s = grid.shape[0]
            p = torch.nn.functional.pad(grid.permute(2, 0, 1), (1, 1, 1, 1))  # (C, S+2, S+2)
            return torch.stack(
                [
                    torch.stack([p[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].flatten() for j in range(s // 2)])
                    for i in range(s // 2)
                ]
            )

        grid1 = split3(grid0) @ t2t.attention2[0].weight.T  # (4, 4, 49)
        expected = t2t.project(split3(grid1).reshape(4, 49 * 9))  # raster order
        assert torch.allclose(out[0], expected, atol=1e-4)

"""A fixed architecture computes exactly its choices, sliced rather than masked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_architecture, reference_bconv
from torch.utils.flop_counter import FlopCounterMode

from supernets import Architecture, BlockChoice


def masked_reference(net, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """The supernet's forward for `arch`, written independently: full-width layers with 0/1 masks."""
    tokens = net.patch_embed(x).flatten(1, 2)  # (B, gh·gw, D)
    tokens = torch.cat([net.cls_token.expand(len(x), -1, -1), tokens], dim=1) + net.pos_embed
    for block, choice in zip(net.blocks, arch.blocks, strict=True):
        attn, mlp = block.attn, block.mlp
        h = block.norm1(tokens)
        if choice.mixer == "msa":
            B, N, D = h.shape
            qkv = F.linear(h, torch.cat([attn.qk.weight, attn.v.weight]), torch.cat([attn.qk.bias, attn.v.bias]))
            q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
            tokens = tokens + attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
        elif choice.mixer.startswith("bconv"):
            tokens = tokens + reference_bconv(attn, h, int(choice.mixer[-1]), batch_stats=False)
        mask = torch.zeros(mlp.hidden_features)
        mask[list(choice.mlp_kept)] = 1.0
        tokens = tokens + mlp.fc2(mlp.act(mlp.fc1(block.norm2(tokens))) * mask)
    return net.head(net.norm(tokens)[:, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_mix_equals_masked_reference(tiny_supernet, seed):
    net = tiny_supernet.eval()
    arch = random_architecture(seed=seed)
    net.fix_architecture(arch)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (net(x) - masked_reference(net, x, arch)).abs().max() <= 1e-5
    assert net.fixed_architecture == arch
    net.release_architecture()
    assert net.fixed_architecture is None


def test_every_mixer_and_an_empty_mlp(tiny_supernet):
    net = tiny_supernet.eval()
    mixers = ["skip", "bconv1", "bconv3", "msa", "bconv3", "bconv1"]
    kept = [(), (0,), tuple(range(0, 192, 2)), tuple(range(192)), (5, 7, 191), tuple(range(100))]
    arch = Architecture("test_vit", 32, 10, tuple(map(BlockChoice, mixers, kept)))
    net.fix_architecture(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (net(x) - masked_reference(net, x, arch)).abs().max() <= 1e-5


MATRIX_OPS = {"addmm", "mm", "bmm", "convolution"}


def matrix_macs(net, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    flops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in flops.items() if op.__name__.split(".")[0] in MATRIX_OPS) // 2


@pytest.mark.parametrize("seed", [0, 3])
def test_fixed_forward_does_only_the_chosen_work(tiny_supernet, seed):
    """Linear and conv MACs of the fixed forward equal a hand count of the chosen layers alone."""
    net = tiny_supernet.eval()
    arch = random_architecture(seed=seed)
    net.fix_architecture(arch)
    B, D, dh, patches, classes = 2, 64, 32, 64, 10
    tokens = patches + 1
    expected = B * patches * D * 3 * 4 * 4 + B * D * classes  # patch embedding and head
    for choice in arch.blocks:
        if choice.mixer == "msa":
            expected += B * tokens * D * 4 * D  # qk, v and proj; the attention matmuls are separate
        elif choice.mixer.startswith("bconv"):
            k = int(choice.mixer[-1])
            expected += B * patches * (D * dh * k * k + dh * D)
        expected += 2 * B * tokens * D * len(choice.mlp_kept)
    assert matrix_macs(net, torch.randn(B, 3, 32, 32)) == expected

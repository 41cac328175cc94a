"""The bconv candidates of unified MSA against convolutions built by hand from the design's formula."""

from __future__ import annotations

import pytest
import torch
from helpers import hand_built_bconv, randomize_, reference_bconv

from supernets import GateConfig, UnifiedAttention

DIM, HEADS, GRID, PREFIX = 32, 4, (5, 6), 1
ON = 20.0  # a logit far beyond the sampler's noise (|logit(u)| < 14), so training draws are certain


def make_attention() -> UnifiedAttention:
    torch.manual_seed(0)
    attn = UnifiedAttention(DIM, HEADS, GRID, PREFIX, qkv_bias=True, gates=GateConfig(head_mix_temperature=0.7))
    return randomize_(attn)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_fixed_bconv_equals_hand_built_conv(kernel_size):
    attn = make_attention().eval()
    x = torch.randn(3, PREFIX + GRID[0] * GRID[1], DIM)
    attn.fixed_mixer = f"bconv{kernel_size}"
    with torch.no_grad():
        out = attn(x)
        ref = reference_bconv(attn, x, kernel_size, batch_stats=False)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_search_bconv_equals_hand_built_conv(kernel_size):
    """The training-time path derives the conv from per-token head mixing, not from a kernel."""
    attn = make_attention().train()
    logits = {1: [ON, -ON, -ON], 3: [ON, ON, -ON]}[kernel_size]
    with torch.no_grad():
        attn.gates.logits.copy_(torch.tensor(logits))
    x = torch.randn(3, PREFIX + GRID[0] * GRID[1], DIM)
    with torch.no_grad():
        ref = reference_bconv(attn, x, kernel_size, batch_stats=True)
        out = attn(x)
    assert (out - ref).abs().max() <= 1e-5


def test_bconv1_is_the_centre_tap_of_bconv3():
    attn = make_attention()
    k3, _, _ = attn.conv_parameters(3)
    k1, b1, p1 = attn.conv_parameters(1)
    assert torch.equal(k1[:, :, 0, 0], k3[:, :, 1, 1])
    kernel, bias, proj = hand_built_bconv(attn, 1)
    torch.testing.assert_close(k1, kernel, atol=1e-6, rtol=0)
    torch.testing.assert_close(b1, bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(p1, proj, atol=1e-6, rtol=0)


def test_wrong_token_count_is_a_clear_error():
    attn = make_attention().eval()
    attn.fixed_mixer = "bconv3"
    with pytest.raises(ValueError, match=r"expected 1 prefix \+ 5x6 patch tokens, got 20"):
        attn(torch.randn(1, 20, DIM))

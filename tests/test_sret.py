"""SReT (Sliced Recursive Transformer): published counts at full size, behaviour on tiny models."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_

from lookup_tables.counting import count_macs
from supernets.families.sret.sret import SlicedAttention, SReT

# Stage grids 4×4, 2×2, 1×1 (16, 4, 1 tokens); G > 1 on both passes of stage 0 and the recursive pass of stage 1.
TINY_SRET = dict(
    img_size=32,
    num_classes=10,
    base_dim=8,
    heads=(1, 2, 2),
    depth=(2, 2, 2),
    recursive_num=(1, 1, 1),
    groups=((4, 2), (1, 2), (1, 1)),
)
UNSLICED = ((1, 1), (1, 1), (1, 1))
FULL_INPUT = torch.zeros(1, 3, 224, 224)


def tiny_sret(**overrides) -> SReT:
    torch.manual_seed(0)
    return randomize_(SReT(**{**TINY_SRET, **overrides}))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def core_gmacs(model: torch.nn.Module) -> float:
    return count_macs(model.eval(), FULL_INPUT, convention="core") / 1e9


def test_variants_are_registered_with_timm():
    assert {"sret_t", "sret_lt", "sret_s"} <= set(timm.list_models("sret*"))


def test_sret_t_matches_published_counts():
    model = timm.create_model("sret_t")
    assert num_params(model) == 4_755_979
    assert model.groups == ((8, 2), (4, 1), (1, 1))
    assert abs(core_gmacs(model) - 1.112) < 0.005  # attention matmuls at their sliced cost
    model.set_groups(UNSLICED)
    assert abs(core_gmacs(model) - 1.366) < 0.005


@pytest.mark.parametrize(("name", "mparams", "gmacs"), [("sret_lt", 5.0, 1.2), ("sret_s", 20.9, 4.2)])
def test_larger_variants_build_and_count(name, mparams, gmacs):
    """The paper's table: SReT-LT 5.0M / 1.2G, SReT-S 20.9M / 4.2G."""
    model = timm.create_model(name)
    assert round(num_params(model) / 1e6, 1) == mparams
    assert round(core_gmacs(model), 1) == gmacs


def test_other_image_size_and_classes():
    model = timm.create_model("sret_t", img_size=256, num_classes=7)
    assert model.pos_embed.shape == (1, 64, 32, 32)
    assert [s.grid_size for s in model.stages] == [(32, 32), (16, 16), (8, 8)]
    assert model.head.out_features == 7 and model.num_classes == 7


def test_builds_on_the_meta_device():
    """The structure alone, without allocating weights (as the supernet registry inspects models)."""
    with torch.device("meta"):
        model = timm.create_model("sret_t", drop_path_rate=0.1)
    assert num_params(model) == 4_755_979


def test_pretrained_is_a_clear_error():
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("sret_t", pretrained=True)


def test_tiny_forward_backward():
    model = tiny_sret().train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert model.forward_features(x).shape == (2, 16, 1, 1)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)
    assert model.no_weight_decay() == {"pos_embed"}


def test_reset_classifier():
    model = tiny_sret()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16)


def test_eval_is_deterministic_with_sliced_recursive_pass():
    model = tiny_sret().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
        torch.manual_seed(123)  # the eval permutation does not depend on the global RNG
        third = model(x)
    assert torch.equal(first, second) and torch.equal(first, third)
    # A freshly built model with the same weights uses the same permutations.
    other = SReT(**TINY_SRET).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), first)


def test_training_permutation_is_random_and_inverted():
    attn = SlicedAttention(8, 2).train()
    perm, inverse = attn.permutation(16, torch.device("cpu"))
    assert torch.equal(perm.sort().values, torch.arange(16))
    assert torch.equal(perm[inverse], torch.arange(16))
    draws = {tuple(attn.permutation(16, torch.device("cpu"))[0].tolist()) for _ in range(5)}
    assert len(draws) > 1
    attn.eval()
    fixed, fixed_inverse = attn.permutation(16, torch.device("cpu"))
    assert torch.equal(fixed[fixed_inverse], torch.arange(16))
    assert not torch.equal(fixed, torch.arange(16))
    assert torch.equal(attn.permutation(16, torch.device("cpu"))[0], fixed)


def reference_attention(attn: SlicedAttention, x: torch.Tensor, groups: int, perm: torch.Tensor | None):
    """Shuffle, cut into chunks, run plain softmax attention on each chunk alone, restore order, project."""
    B, N, C = x.shape
    heads, dh = attn.num_heads, C // attn.num_heads
    q_w, k_w, v_w = attn.qkv.weight.split(C)
    q_b, k_b, v_b = attn.qkv.bias.split(C)
    order = perm if perm is not None else torch.arange(N)
    mixed = torch.zeros(B, N, C)
    for chunk in order.reshape(groups, N // groups):
        tokens = x[:, chunk]  # (B, N/G, C)
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            q = tokens @ q_w[rows].T + q_b[rows]
            k = tokens @ k_w[rows].T + k_b[rows]
            v = tokens @ v_w[rows].T + v_b[rows]
            weights = torch.softmax(q @ k.transpose(1, 2) / dh**0.5, dim=-1)
            mixed[:, chunk, rows] = weights @ v  # written back at the tokens' own positions
    return mixed @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_sliced_attention_equals_attention_per_chunk(groups):
    torch.manual_seed(0)
    attn = randomize_(SlicedAttention(8, 2))
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        attn.eval()
        assert torch.allclose(attn(x, groups), reference_attention(attn, x, groups, None), atol=1e-5)
        perm = attn.permutation(16, x.device)[0] if groups > 1 else None
        assert torch.allclose(attn(x, groups, permute=True), reference_attention(attn, x, groups, perm), atol=1e-5)
        attn.train()
        torch.manual_seed(7)
        out = attn(x, groups, permute=True)
        torch.manual_seed(7)
        perm = torch.randperm(16) if groups > 1 else None  # the draw the layer made
        assert torch.allclose(out, reference_attention(attn, x, groups, perm), atol=1e-5)


def test_full_attention_ignores_the_permutation():
    torch.manual_seed(0)
    attn = randomize_(SlicedAttention(8, 2)).eval()
    x = torch.randn(2, 16, 8)
    perm = attn.permutation(16, x.device)[0]
    with torch.no_grad():
        assert torch.allclose(attn(x, 1), reference_attention(attn, x, 1, perm), atol=1e-5)
        assert not torch.allclose(attn(x, 4, permute=True), attn(x, 4), atol=1e-3)


def test_changing_groups_keeps_the_weights():
    model = tiny_sret().eval()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        sliced = model(x)
        model.set_groups(((1, 1), (1, 1), (1, 1)))
        unsliced = model(x)
    assert model.groups == UNSLICED
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.allclose(sliced, unsliced, atol=1e-4)
    model.stages[0].set_groups((16, 8))  # one stage alone, any divisor of its 16 tokens
    assert model.groups[0] == (16, 8)


@pytest.mark.parametrize(
    "groups",
    [
        ((3, 1), (1, 1), (1, 1)),  # 3 does not divide 16 tokens
        ((1, 1), (1, 8), (1, 1)),  # 8 > the 4 tokens of stage 1
        ((0, 1), (1, 1), (1, 1)),
        ((1, 1), (1, 1)),  # a stage missing
        ((1,), (1, 1), (1, 1)),  # a pass missing
    ],
)
def test_invalid_groups_raise(groups):
    model = tiny_sret()
    with pytest.raises(ValueError):
        model.set_groups(groups)
    assert model.groups == TINY_SRET["groups"]  # unchanged after a rejected setting
    with pytest.raises(ValueError):
        SReT(**{**TINY_SRET, "groups": groups})


def test_attention_rejects_groups_not_dividing_tokens():
    with pytest.raises(ValueError, match="dividing the 16 tokens"):
        SlicedAttention(8, 2)(torch.randn(1, 16, 8), 3)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size 32"):
        tiny_sret()(torch.randn(1, 3, 64, 64))

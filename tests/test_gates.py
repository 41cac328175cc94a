"""Gate semantics: cumulative mixer gates, per-unit MLP gates, the sampler and its gradients."""

from __future__ import annotations

import pytest
import torch

from supernets import BinaryGates, GateConfig, UnifiedAttention

ON, OFF = 20.0, -20.0  # far beyond the sampler's noise (|logit(u)| < 14): training draws are certain
DIM, HEADS, GRID = 32, 4, (4, 4)


def attention_with_gates(logits: list[float]) -> UnifiedAttention:
    torch.manual_seed(0)
    attn = UnifiedAttention(DIM, HEADS, GRID, num_prefix_tokens=1, qkv_bias=True).train()
    with torch.no_grad():
        attn.gates.logits.copy_(torch.tensor(logits))
    return attn


def fixed_output(attn: UnifiedAttention, mixer: str, x: torch.Tensor) -> torch.Tensor:
    attn.fixed_mixer = mixer
    try:
        return attn(x)
    finally:
        attn.fixed_mixer = None


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(2, 1 + GRID[0] * GRID[1], DIM)


def test_msa_cannot_be_on_while_bconv3_is_off(tokens):
    attn = attention_with_gates([ON, OFF, ON])
    assert attn.current_mixer() == "bconv1"
    torch.testing.assert_close(attn(tokens), fixed_output(attn, "bconv1", tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("logits", "mixer"),
    [([ON, ON, ON], "msa"), ([ON, ON, OFF], "bconv3"), ([ON, OFF, OFF], "bconv1"), ([OFF, ON, ON], "skip")],
)
def test_only_the_most_expensive_active_op_contributes(tokens, logits, mixer):
    attn = attention_with_gates(logits)
    assert attn.current_mixer() == mixer
    out = attn(tokens)  # training mode: every candidate is computed and weighted by its gate product
    torch.testing.assert_close(out, fixed_output(attn, mixer, tokens), atol=1e-5, rtol=0)
    other = [m for m in ("bconv1", "bconv3", "msa") if m != mixer]
    for m in other:
        assert (out - fixed_output(attn, m, tokens)).abs().max() > 1e-3


def test_all_gates_off_leaves_the_residual_alone(tiny_supernet):
    net = tiny_supernet.train()
    block = net.blocks[0]
    with torch.no_grad():
        block.attn.gates.logits.fill_(OFF)
        block.mlp.gates.logits.fill_(ON)
    x = torch.randn(2, 65, 64)
    assert torch.equal(block.attn(block.norm1(x)), torch.zeros_like(x))
    torch.testing.assert_close(block(x), x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(x)))))
    # With the MLP gates off too, the block adds the MLP's output bias alone.
    with torch.no_grad():
        block.mlp.gates.logits.fill_(OFF)
    torch.testing.assert_close(block(x), x + block.mlp.fc2.bias, atol=1e-6, rtol=0)


def test_gate_logits_get_gradients_through_the_estimator(tiny_supernet):
    net = tiny_supernet.train()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(5):  # several draws, so every gate is sampled where its gradient can flow
        net(x).logsumexp(-1).sum().backward()  # no in-place autograd error on current PyTorch
    for gates in net.gate_parameters():
        assert gates.grad is not None
        assert (gates.grad != 0).all(), gates.grad


def test_sampler_is_bernoulli_in_value_and_deterministic_in_eval():
    torch.manual_seed(0)
    gates = BinaryGates(20000, init=0.8).train()
    sample = gates()
    assert set(sample.detach().unique().tolist()) == {0.0, 1.0}
    # A binary-concrete draw rounded at 0.5 is on with probability sigmoid(logit).
    assert abs(sample.mean().item() - torch.sigmoid(torch.tensor(0.8)).item()) < 0.01
    with torch.no_grad():
        gates.logits.copy_(torch.linspace(-1, 1, 20000))
    gates.eval()
    assert torch.equal(gates(), (gates.logits > 0).float())


def test_gates_start_at_the_configured_logit(tiny_supernet):
    assert all(torch.all(p == 1.5) for p in tiny_supernet.gate_parameters())
    attn = UnifiedAttention(DIM, HEADS, GRID, 1, gates=GateConfig(init=0.3))
    assert torch.all(attn.gates.logits == 0.3)
    assert tiny_supernet.architecture() == tiny_supernet.dense_architecture()

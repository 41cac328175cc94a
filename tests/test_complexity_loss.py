"""Budgets, the differentiable cost of the gates, and the complexity loss that pulls them to a target."""

from __future__ import annotations

import pytest
import torch

from lookup_tables import build_lookup_table, differentiable_flops
from spvit_search.complexity import ComplexityLoss, check_budget, parse_budget


@pytest.mark.parametrize(
    ("text", "macs"),
    [("3.2G", 3_200_000_000), ("3200M", 3_200_000_000), ("850k", 850_000), ("0.7x", 700), ("1e3", 1000)],
)
def test_budget_parsing(text, macs):
    assert parse_budget(text, dense=1000) == macs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3.2Q", "malformed"),
        ("fast", "malformed"),
        ("-1G", "must be positive"),
        ("0x", "must be positive"),
        ("0G", "must be positive"),
    ],
)
def test_bad_budgets_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(text, dense=1000)


def test_budget_outside_the_range_prints_the_range():
    with pytest.raises(ValueError, match=r"'0.01x' = 0.0100 GMACs is outside .* \[0.1000, 1.0000\] GMACs"):
        check_budget(parse_budget("0.01x", 10**9), (10**8, 10**9), "0.01x")
    check_budget(5 * 10**8, (10**8, 10**9))


@pytest.fixture
def net_and_lut(tiny_supernet):
    return tiny_supernet, build_lookup_table(tiny_supernet, "fvcore")


def test_threshold_cost_is_the_deterministic_architecture(net_and_lut):
    net, lut = net_and_lut
    torch.manual_seed(0)
    with torch.no_grad():
        for logits in net.gate_parameters():
            logits.copy_(torch.randn_like(logits))
    assert differentiable_flops(net, lut, "threshold").item() == lut.flops(net.architecture())


def test_expected_cost_is_the_mean_over_gate_draws(net_and_lut):
    net, lut = net_and_lut
    block = net.blocks[2]
    with torch.no_grad():
        for other in net.blocks:  # every other mixer is msa for certain
            other.attn.gates.logits.fill_(40.0)
        block.attn.gates.logits.copy_(torch.tensor([0.4, -0.2, 1.0]))
    p1, p3, pa = torch.sigmoid(torch.tensor([0.4, -0.2, 1.0], dtype=torch.float64)).tolist()
    # Probabilities of the mixers under cumulative gates, written out by hand.
    probs = {"skip": 1 - p1, "bconv1": p1 * (1 - p3), "bconv3": p1 * p3 * (1 - pa), "msa": p1 * p3 * pa}
    expected_mixer = sum(probs[m] * lut.mixer_macs[2][i] for i, m in enumerate(["skip", "bconv1", "bconv3", "msa"]))
    dense_mixer = lut.mixer_macs[2][3]
    keep = torch.sigmoid(torch.tensor(1.5, dtype=torch.float64)).item()  # every MLP gate starts at 1.5
    expected_mlp_shift = sum((keep - 1) * lut.mlp_unit_macs[i] * lut.mlp_hidden[i] for i in range(6))
    value = differentiable_flops(net, lut, "expected").item()
    assert value == pytest.approx(lut.dense_flops() - dense_mixer + expected_mixer + expected_mlp_shift, rel=1e-9)


@pytest.mark.parametrize("estimator", ["threshold", "expected"])
def test_turning_a_gate_on_costs_more(net_and_lut, estimator):
    net, lut = net_and_lut
    differentiable_flops(net, lut, estimator).backward()
    for logits in net.gate_parameters():
        assert (logits.grad > 0).all()


@pytest.mark.parametrize("form", ["paper", "normalized", "auto"])
def test_loss_is_zero_at_the_target_and_pulls_towards_it(form):
    loss = ComplexityLoss(target=2_000_000_000, form=form, lam=3.0)
    assert loss(torch.tensor(2e9, dtype=torch.float64)).item() == 0.0
    for flops, sign in [(2.5e9, 1.0), (1.5e9, -1.0)]:
        f = torch.tensor(flops, dtype=torch.float64, requires_grad=True)
        loss(f).backward()
        assert torch.sign(f.grad).item() == sign


def test_paper_form_is_in_gmacs():
    loss = ComplexityLoss(target=3_000_000_000, form="paper", lam=2.0)
    assert loss(torch.tensor(2.5e9, dtype=torch.float64)).item() == pytest.approx(2.0 * 0.5**2)


def test_automatic_lambda_reaches_the_target_without_data(tiny_supernet):
    """Only the complexity loss trains the gates, from the dense architecture to 0.6x within ±1%."""
    net = tiny_supernet
    lut = build_lookup_table(net, "fvcore")
    torch.manual_seed(0)
    with torch.no_grad():  # distinct logits, all still on (data would make them distinct in a real search)
        for logits in net.gate_parameters():
            logits.add_(torch.empty_like(logits).uniform_(-0.5, 0.5))
    assert net.architecture() == net.dense_architecture()
    target = parse_budget("0.6x", lut.dense_flops())
    loss = ComplexityLoss(target, form="auto")
    optimizer = torch.optim.Adam(net.gate_parameters(), lr=0.05)
    for _ in range(300):
        flops = differentiable_flops(net, lut)
        optimizer.zero_grad()
        loss(flops).backward()
        optimizer.step()
        loss.update(flops.detach())
    assert abs(lut.flops(net.architecture()) / target - 1) <= 0.01


def test_unknown_form_and_estimator():
    with pytest.raises(ValueError, match="unknown complexity loss 'l1'"):
        ComplexityLoss(target=1, form="l1")
    from lookup_tables.cost import gate_indicators

    with pytest.raises(ValueError, match="unknown estimator"):
        gate_indicators(torch.zeros(3), "sampled")

"""The projection onto a FLOPs budget: flips the least confident gates until F <= target, then fills up."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from lookup_tables import build_lookup_table
from spvit_search.projection import DEFAULT_EPS, attention_gate_logits, mixer_indices, project_to_budget
from supernets import MIXERS, build_supernet

FRACTIONS = (0.3, 0.5, 0.7, 0.9)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def deit_tiny():
    """Full-size DeiT-Ti on the meta device, priced by the SPViT formula (needs no real tensors)."""
    with torch.device("meta"):
        net = build_supernet("deit_tiny_patch16_224")
    return net, build_lookup_table(net, "spvit")


@pytest.fixture(scope="module")
def tiny():
    net = build_supernet("test_vit", img_size=32, patch_size=4, num_classes=10)
    return net, build_lookup_table(net, "fvcore")


def set_logits(net, attn, units) -> None:
    """Give every gate real (CPU) logits: `attn` (depth, 3), `units` one array per block."""
    for block, a, u in zip(net.blocks, attn, units, strict=True):
        block.attn.gates.logits = nn.Parameter(torch.as_tensor(np.asarray(a), dtype=torch.float32))
        block.mlp.gates.logits = nn.Parameter(torch.as_tensor(np.asarray(u), dtype=torch.float32))


def set_random_logits(net, seed: int, shift: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    attn = [torch.randn(3, generator=gen) + shift for _ in net.blocks]
    units = [torch.randn(b.mlp.hidden_features, generator=gen) + shift for b in net.blocks]
    set_logits(net, attn, units)


def logits_of(net) -> tuple[np.ndarray, list[np.ndarray]]:
    """(attention logits (depth, 3), MLP logits per block) as float32 numpy copies."""
    attn = np.stack([b.attn.gates.logits.detach().numpy().copy() for b in net.blocks])
    return attn, [b.mlp.gates.logits.detach().numpy().copy() for b in net.blocks]


def effective_on(attn: np.ndarray, units: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Masks of the decisions that carry cost: each block's leading run of gates and its kept units."""
    lead = np.arange(3)[None, :] < mixer_indices(attn > 0)[:, None]
    return lead, [u > 0 for u in units]


def next_gate_cost(lut, attn_on: np.ndarray, block: int) -> int | None:
    """Extra MACs of turning on the block's next gate (None for msa), with the cumulative rule."""
    m = int(mixer_indices(attn_on[block]))
    if m == 3:
        return None
    on = attn_on[block].copy()
    on[m] = True
    return int(lut.mixer_macs[block, mixer_indices(on)] - lut.mixer_macs[block, m])


def assert_maximal(lut, arch, target: int, attn: np.ndarray, units: list[np.ndarray]) -> None:
    """No single remaining move fits: every off unit and every block's next gate costs more than T - F."""
    gap = target - lut.flops(arch)
    for block, u in enumerate(units):
        if (u <= 0).any():
            assert lut.mlp_unit_macs[block] > gap
        extra = next_gate_cost(lut, attn > 0, block)
        assert extra is None or extra > gap


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_meets_budget_within_one_percent_on_deit_tiny(deit_tiny, fraction):
    net, lut = deit_tiny
    target = round(fraction * lut.dense_flops())
    for seed in SEEDS:
        set_random_logits(net, seed)
        arch = project_to_budget(net, lut, target)
        flops = lut.flops(arch)
        assert 0.99 * target <= flops <= target, (seed, flops, target)
        assert net.architecture() == arch
        assert_maximal(lut, arch, target, *logits_of(net))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_meets_budget_from_the_initial_tied_logits(deit_tiny, fraction):
    net, lut = deit_tiny
    set_logits(net, [np.full(3, 1.5) for _ in net.blocks], [np.full(b.mlp.hidden_features, 1.5) for b in net.blocks])
    target = round(fraction * lut.dense_flops())
    arch = project_to_budget(net, lut, target)
    assert 0.99 * target <= lut.flops(arch) <= target
    assert net.architecture() == arch


def test_tiny_fvcore_table(tiny):
    net, lut = tiny
    for seed in SEEDS:
        for fraction in FRACTIONS:
            set_random_logits(net, seed)
            target = round(fraction * lut.dense_flops())
            arch = project_to_budget(net, lut, target)
            assert lut.flops(arch) <= target
            assert net.architecture() == arch
            assert_maximal(lut, arch, target, *logits_of(net))


def test_only_flipped_gates_change_and_get_eps(deit_tiny):
    net, lut = deit_tiny
    for seed in SEEDS:
        set_random_logits(net, seed)
        attn0, units0 = logits_of(net)
        project_to_budget(net, lut, round(0.5 * lut.dense_flops()))
        attn1, units1 = logits_of(net)
        for before, after in [(attn0, attn1), *zip(units0, units1, strict=True)]:
            flipped = (before > 0) != (after > 0)
            assert np.array_equal(before[~flipped], after[~flipped])  # bit for bit
            assert np.allclose(np.abs(after[flipped]), DEFAULT_EPS)
        assert sum(int(((b > 0) != (a > 0)).sum()) for b, a in zip(units0, units1, strict=True)) > 0


def test_reduce_phase_drops_exactly_the_least_confident(deit_tiny):
    """Every decision the reduce phase turns off has a logit <= every cost-carrying decision still on."""
    net, lut = deit_tiny
    for seed in SEEDS:
        for fraction in FRACTIONS:
            set_random_logits(net, seed, shift=2.0)  # nearly all on: over every target
            attn0, units0 = logits_of(net)
            target = round(fraction * lut.dense_flops())
            assert lut.flops(net.architecture()) > target
            arch = project_to_budget(net, lut, target, fill=False)
            assert lut.flops(arch) <= target
            attn1, units1 = logits_of(net)
            assert not any(((a > 0) & (b <= 0)).any() for b, a in zip([attn0, *units0], [attn1, *units1], strict=True))
            dropped = np.concatenate(
                [
                    attn0[(attn0 > 0) & (attn1 <= 0)],
                    *[b[(b > 0) & (a <= 0)] for b, a in zip(units0, units1, strict=True)],
                ]
            )
            lead, kept = effective_on(attn1, units1)
            still_on = np.concatenate([attn0[lead], *[b[k] for b, k in zip(units0, kept, strict=True)]])
            assert dropped.size > 0
            assert dropped.max() <= still_on.min(), (seed, fraction)
            # It stops as soon as it fits: undoing its last drop (the largest logit) would exceed the target.
            gate_drops = np.argwhere((attn0 > 0) & (attn1 <= 0))
            last_gate = [(i, j) for i, j in gate_drops if attn0[i, j] == dropped.max()]
            if last_gate:  # the block's mixer now stops right before that gate, its next gate
                undo = next_gate_cost(lut, attn1 > 0, int(last_gate[0][0]))
            else:
                block = next(
                    i for i, (b, a) in enumerate(zip(units0, units1, strict=True)) if dropped.max() in b[a <= 0]
                )
                undo = int(lut.mlp_unit_macs[block])
            assert lut.flops(arch) + undo > target


def test_kept_units_are_the_top_ones_by_logit(deit_tiny):
    """Every DeiT block's units cost the same, so the fill keeps exactly the top units by logit, over all blocks."""
    net, lut = deit_tiny
    assert len(set(lut.mlp_unit_macs.tolist())) == 1
    checked = 0
    for seed in SEEDS:
        for fraction in FRACTIONS:
            set_random_logits(net, seed)
            _, units0 = logits_of(net)
            project_to_budget(net, lut, round(fraction * lut.dense_flops()))
            _, units1 = logits_of(net)
            kept = np.concatenate([b[a > 0] for b, a in zip(units0, units1, strict=True)])
            dropped = np.concatenate([b[a <= 0] for b, a in zip(units0, units1, strict=True)])
            if dropped.size and kept.size:
                assert dropped.max() < kept.min(), (seed, fraction)
            checked += dropped.size > 0 and kept.size > 0
    assert checked >= len(SEEDS) * (len(FRACTIONS) - 1)


def test_under_budget_start_only_fills(deit_tiny):
    net, lut = deit_tiny
    target = round(0.7 * lut.dense_flops())
    for seed in SEEDS:
        set_random_logits(net, seed, shift=-1.0)  # mostly off: starts well under the target
        attn0, units0 = logits_of(net)
        start = lut.flops(net.architecture())
        assert start < 0.9 * target
        arch = project_to_budget(net, lut, target)
        assert start <= lut.flops(arch) <= target
        assert lut.flops(arch) >= 0.99 * target
        attn1, units1 = logits_of(net)
        # Nothing that was on is turned off: only the fill ran.
        for before, after in [(attn0, attn1), *zip(units0, units1, strict=True)]:
            assert np.array_equal(before[before > 0], after[before > 0])


def test_projection_is_idempotent(deit_tiny):
    net, lut = deit_tiny
    set_random_logits(net, 3)
    target = round(0.6 * lut.dense_flops())
    arch = project_to_budget(net, lut, target)
    attn, units = logits_of(net)
    assert project_to_budget(net, lut, target) == arch
    again_attn, again_units = logits_of(net)
    assert np.array_equal(attn, again_attn)
    assert all(np.array_equal(a, b) for a, b in zip(units, again_units, strict=True))


def test_target_below_minimum_raises_with_the_range(deit_tiny):
    net, lut = deit_tiny
    set_random_logits(net, 0)
    before = logits_of(net)
    low, high = lut.range()
    with pytest.raises(ValueError, match=re.escape(f"[{low / 1e9:.4f}, {high / 1e9:.4f}]")):
        project_to_budget(net, lut, low - 1)
    after = logits_of(net)
    assert np.array_equal(before[0], after[0]) and all(map(np.array_equal, before[1], after[1]))
    # The minimum itself is reachable: every mixer skipped, every unit dropped.
    arch = project_to_budget(net, lut, low)
    assert lut.flops(arch) == low
    assert arch.mixers == ["skip"] * net.depth


def test_target_above_dense_keeps_everything(tiny):
    net, lut = tiny
    set_random_logits(net, 0)
    assert project_to_budget(net, lut, 2 * lut.dense_flops()) == net.dense_architecture()


def _all_on(net, first_block_gates):
    attn = [np.asarray(first_block_gates, dtype=np.float32)] + [np.full(3, 3.0) for _ in net.blocks[1:]]
    set_logits(net, attn, [np.full(b.mlp.hidden_features, 2.0) for b in net.blocks])


def test_off_first_gate_with_later_gates_on_is_skip_and_jumps_to_msa(tiny):
    """Logits [-, +, +] are skip; turning gate 0 on gives msa at once, so only a msa-sized gap lets it on."""
    net, lut = tiny
    msa_over_skip = int(lut.mixer_macs[0, MIXERS.index("msa")] - lut.mixer_macs[0, MIXERS.index("skip")])

    _all_on(net, [-0.5, 2.0, 2.0])
    assert net.architecture().mixers[0] == "skip"
    start = lut.flops(net.architecture())
    unit = int(lut.mlp_unit_macs[0])
    # bconv1 would fit but is not reachable: the exchange reaches msa by giving up the least confident units.
    arch = project_to_budget(net, lut, start + msa_over_skip - 1)
    assert arch.mixers[0] == "msa" and start + msa_over_skip - 1 - unit < lut.flops(arch) <= start + msa_over_skip - 1
    assert sum(len(b.mlp_kept) for b in arch.blocks) == sum(net.mlp_hidden) - 1

    _all_on(net, [-0.5, 2.0, 2.0])

    arch = project_to_budget(net, lut, start + msa_over_skip)
    assert arch.mixers[0] == "msa" and lut.flops(arch) == start + msa_over_skip
    assert net.blocks[0].attn.gates.logits.tolist() == pytest.approx([DEFAULT_EPS, 2.0, 2.0])


def test_reduce_leaves_gates_outside_the_leading_run_alone(tiny):
    """[0.2, 0.1, 0.3] is msa: the reduce turns gate 1 off (bconv1), then gate 0 (skip); gate 2 then holds nothing."""
    net, lut = tiny
    msa = int(lut.mixer_macs[0, MIXERS.index("msa")])
    _all_on(net, [0.2, 0.1, 0.3])
    start = lut.flops(net.architecture())
    arch = project_to_budget(net, lut, start - msa)
    assert arch.mixers[0] == "skip" and lut.flops(arch) == start - msa
    assert net.blocks[0].attn.gates.logits.tolist() == pytest.approx([-DEFAULT_EPS, -DEFAULT_EPS, 0.3])
    assert all(len(b.mlp_kept) == h for b, h in zip(arch.blocks, net.mlp_hidden, strict=True))

    _all_on(net, [0.1, -2.0, 2.0])  # bconv1: turning gate 0 off is the only cheaper choice
    start = lut.flops(net.architecture())
    arch = project_to_budget(net, lut, start - 1, fill=False)
    assert arch.mixers[0] == "skip"
    assert net.blocks[0].attn.gates.logits.tolist() == pytest.approx([-DEFAULT_EPS, -2.0, 2.0])
    # With the fill, the exchange buys bconv1 back with the least confident unit: one unit below the start.
    _all_on(net, [0.1, -2.0, 2.0])
    arch = project_to_budget(net, lut, start - 1)
    assert arch.mixers[0] == "bconv1" and lut.flops(arch) == start - int(lut.mlp_unit_macs[0])


def test_mixer_indices_follow_the_cumulative_rule(tiny):
    net, _ = tiny
    for seed in SEEDS:
        set_random_logits(net, seed)
        indices = mixer_indices(attention_gate_logits(net) > 0)
        assert [MIXERS[i] for i in indices] == [b.attn.current_mixer() for b in net.blocks]
    assert mixer_indices(np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=bool)).tolist() == [0, 1, 2, 3]


def test_rejects_a_table_of_another_supernet(tiny, deit_tiny):
    net, _ = tiny
    _, other = deit_tiny
    with pytest.raises(ValueError, match="lookup table"):
        project_to_budget(net, other, other.dense_flops())

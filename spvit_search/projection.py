"""Projection of the searched gates onto a FLOPs budget: flip the least confident gates until it fits.

The search's complexity loss only pulls the architecture towards the target; the optional final
projection makes the deterministic architecture (gate logit > 0) meet the budget exactly: lookup-table
MACs F <= T, and as close below T as the granularity of the search space allows.

Decisions and their confidence
------------------------------
A *decision* is one MLP hidden unit's gate (kept iff its logit > 0) or one of a block's cumulative
attention gates [bconv1, bconv3, msa]. The block's mixer is MIXERS[number of leading gates with
logit > 0] (see `mixer_indices`), so only some gates matter: the *leading run* (gates 0..m-1 of a
block with mixer index m) holds the current mixer, and the *next gate* (gate m) is the only one whose
flip can upgrade it. Turning gate j of the leading run off makes the mixer MIXERS[j] (one or more
steps down); turning the next gate on makes the mixer MIXERS[new leading run], which may jump several
steps when later gates are already on (logits [-, +, +] is skip; turning gate 0 on gives msa). The
confidence of a decision is |logit|. Ties are broken by a fixed total order: (logit, block, mixer
gates before MLP units, gate or unit index).

Algorithm (greedy, deterministic, numpy and plain Python: well under a second for DeiT-B)
------------------------------------------------------------------------------------------
1. Reduce. While F > T, take the "on" decisions in increasing order of logit (least confident first):
   every kept MLP unit and every gate of every block's leading run. Turn the decision off if that
   lowers F (an MLP unit always does; a gate does while it is still in its block's leading run and
   the cheaper mixer costs less), otherwise leave it alone. Stop as soon as F <= T. If F <= T to begin
   with, this phase does nothing.
2. Fill. Walk the "off" decisions in decreasing order of their original logit: first those the reduce
   phase turned off (most confident first, so an unnecessary reduction is undone), then those that
   were off, closest to zero first. Candidates are every MLP unit that is off and every block's next
   gate (a block's following gate becomes a candidate once its next gate is turned on). Turn a
   candidate on iff F stays <= T (a greedy knapsack fill). This phase runs even when the architecture
   started under budget, so the result is as close to T as the greedy allows.
3. Exchange. Mixer steps are coarse: with every MLP unit kept, a downgrade in the reduce phase can leave
   F well below T with nothing left to fill. So while F is more than `slack` (1%) below T, and some
   block's next gate (largest logit first) can be turned on and paid for by turning off the least
   confident kept units, bringing F closer to T (still <= T), do so; then fill again. Exchanges
   override confident decisions, hence the slack: within it the search's choices stand.
4. Write. Every gate whose on/off state differs from the start gets the logit +eps (now on) or -eps
   (now off), eps = 1e-3 by default: the deterministic rule reproduces the projected architecture,
   and the flipped decisions stay the least confident ones should the search go on. Every other
   logit is left exactly as it was.

Guarantees (T >= lut.range(full_size=True)[0]; a smaller T raises `ValueError` with the range)
----------------------------------------------------------------------------------------------
- Budget: F <= T, and `net.architecture()` afterwards is the returned architecture.
- Maximal: no single remaining move fits: every MLP unit left off costs more than T - F, and so does
  turning on any block's next gate. So T - F is below the per-unit MACs whenever any unit is off.
- Minimal edits: a logit changes only if its gate's on/off state changed; its new value is +-eps.
- Reduce order: every decision the reduce phase turned off has a logit no larger than that of every
  cost-carrying decision still effective after it (each kept MLP unit and each gate of a leading run).
  `fill=False` stops there, with the fewest flips.
- Fill order: a candidate left off while one with a smaller original logit was turned on costs more.
  Hence, among MLP units of equal per-unit MACs (every block of a DeiT/ViT), the kept units are
  exactly the top ones by logit: no kept unit has a smaller logit than a dropped one.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from torch import nn

from lookup_tables import LookupTable
from supernets import MIXERS, Architecture

from .complexity import check_budget

DEFAULT_EPS = 1e-3
_NUM_GATES = len(MIXERS) - 1  # cumulative attention gates per block: [bconv1, bconv3, msa]
_MIXER, _UNIT = 0, 1  # decision kinds, in tie-break order


def mixer_indices(on: np.ndarray) -> np.ndarray:
    """Index into MIXERS per block from cumulative gate states (depth, 3): the length of the leading run of ons."""
    return np.cumprod(np.asarray(on, dtype=bool), axis=-1).sum(axis=-1)


def attention_gate_logits(net: nn.Module) -> np.ndarray:
    """Every block's attention gate logits as a (depth, 3) float64 array; `mixer_indices(logits > 0)` is the
    per-block mixer index of the deterministic rule (`UnifiedAttention.current_mixer()` for one block)."""
    return torch.stack([b.attn.gates.logits.detach().double().cpu() for b in net.blocks]).numpy()


def project_to_budget(
    net: nn.Module,
    lut: LookupTable,
    target: int,
    *,
    fill: bool = True,
    slack: float = 0.01,
    eps: float = DEFAULT_EPS,
) -> Architecture:
    """Flip the least confident gates of `net` in place so that its architecture costs <= `target` MACs.

    See the module docstring for the algorithm and what it guarantees. `fill=False` stops after the
    reduce phase. Returns the projected architecture, which `net.architecture()` now also returns.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    lut.check_supernet(net)
    low, high = lut.range(full_size=True)  # the gates choose at full depth and width
    if target < low:
        check_budget(target, (low, high))  # raises, printing the search space's range
    target = int(target)

    gate_logits = attention_gate_logits(net)  # (depth, 3)
    unit_logits = [b.mlp.gates.logits.detach().double().cpu().numpy() for b in net.blocks]  # depth × (hidden,)
    state = _State(lut, gate_logits > 0, [u > 0 for u in unit_logits])
    state.reduce(target, gate_logits, unit_logits)
    if fill:
        state.fill(target, gate_logits, unit_logits)
        # Exchanges override confident decisions, so they run only while F is not yet within `slack` of T.
        while target - state.flops > slack * target and state.exchange(target, gate_logits, unit_logits):
            state.fill(target, gate_logits, unit_logits)

    _write_flips(net, gate_logits > 0, state.gates_on, [u > 0 for u in unit_logits], state.units_on, eps)
    arch = net.architecture()
    if lut.flops(arch) != state.flops:  # e.g. a logit dtype that cannot hold eps
        raise RuntimeError(f"projection failed: {lut.flops(arch)} MACs after writing the gates, {state.flops} planned")
    return arch


class _State:
    """Gate states under projection (copies; the net is written at the end) and their lookup-table MACs."""

    def __init__(self, lut: LookupTable, gates_on: np.ndarray, units_on: list[np.ndarray]) -> None:
        self.mixer_macs: list[list[int]] = lut.mixer_macs.tolist()  # (depth, 4)
        self.unit_macs: list[int] = lut.mlp_unit_macs.tolist()  # (depth,)
        self.gates_on = gates_on.copy()  # (depth, 3)
        self.units_on = [u.copy() for u in units_on]  # depth × (hidden,)
        self.mixer: list[int] = mixer_indices(gates_on).tolist()  # (depth,) index into MIXERS
        depth = len(self.mixer)
        widths = np.array([int(u.sum()) for u in units_on], dtype=np.int64)
        per_block = lut.mixer_macs[np.arange(depth), self.mixer] + lut.mlp_fixed_macs + lut.mlp_unit_macs * widths
        self.flops = lut.fixed_macs + int(per_block.sum())

    def reduce(self, target: int, gate_logits: np.ndarray, unit_logits: list[np.ndarray]) -> None:
        """Phase 1: turn "on" decisions off, least confident first, while F > target."""
        if self.flops <= target:
            return
        blocks, kinds, indices, logits = [], [], [], []
        for block, row in enumerate(unit_logits):
            kept = np.flatnonzero(row > 0)
            lead = np.arange(self.mixer[block])  # the gates holding the current mixer
            blocks += [np.full(kept.size + lead.size, block)]
            kinds += [np.full(kept.size, _UNIT), np.full(lead.size, _MIXER)]
            indices += [kept, lead]
            logits += [row[kept], gate_logits[block, lead]]
        blocks, kinds, indices = (np.concatenate(a).astype(np.int64) for a in (blocks, kinds, indices))
        order = np.lexsort((indices, kinds, blocks, np.concatenate(logits)))  # increasing (logit, block, kind, index)
        for block, kind, index in zip(
            blocks[order].tolist(), kinds[order].tolist(), indices[order].tolist(), strict=True
        ):
            if kind == _UNIT:
                saving = self.unit_macs[block]
                if saving > 0:
                    self.units_on[block][index] = False
            else:
                current = self.mixer[block]
                # A gate no longer in the leading run (a cheaper one went off) holds nothing: turning it off saves 0.
                saving = self.mixer_macs[block][current] - self.mixer_macs[block][index] if index < current else 0
                if saving > 0:
                    self.gates_on[block, index] = False
                    self.mixer[block] = index
            if saving > 0:
                self.flops -= saving
                if self.flops <= target:
                    return

    def fill(self, target: int, gate_logits: np.ndarray, unit_logits: list[np.ndarray]) -> None:
        """Phase 2: turn "off" decisions on, largest original logit first, whenever F stays <= target."""
        # The MLP candidates are fixed from here on: every unit that is off, sorted once.
        blocks, indices, logits = [], [], []
        for block, (row, on) in enumerate(zip(unit_logits, self.units_on, strict=True)):
            off = np.flatnonzero(~on)
            blocks.append(np.full(off.size, block))
            indices.append(off)
            logits.append(row[off])
        blocks, indices, logits = (np.concatenate(a) for a in (blocks, indices, logits))
        order = np.lexsort((indices, blocks, logits))[::-1]  # decreasing (logit, block, index)
        units = list(zip(logits[order].tolist(), blocks[order].tolist(), indices[order].tolist(), strict=True))
        # Mixer candidates appear as blocks upgrade: a max-heap (negated keys) of each block's next gate.
        gates: list[tuple[float, int, int]] = []
        for block in range(len(self.mixer)):
            self._push_next_gate(gates, block, gate_logits)
        u = 0
        while u < len(units) or gates:
            # Merge both streams in decreasing (logit, block, kind, index) order; units (kind 1) after gates (0).
            if gates and (u == len(units) or (-gates[0][0], -gates[0][1], _MIXER) > (*units[u][:2], _UNIT)):
                _, neg_block, index = heapq.heappop(gates)
                block = -neg_block
                current, upgraded = self.mixer[block], self._upgrade(block, index)
                extra = self.mixer_macs[block][upgraded] - self.mixer_macs[block][current]
                if self.flops + extra <= target:
                    self.gates_on[block, index] = True
                    self.mixer[block] = upgraded
                    self.flops += extra
                    self._push_next_gate(gates, block, gate_logits)
                # Otherwise the block stays as it is: its next gate is the only way up.
            else:
                _, block, index = units[u]
                u += 1
                if self.flops + self.unit_macs[block] <= target:
                    self.units_on[block][index] = True
                    self.flops += self.unit_macs[block]

    def exchange(self, target: int, gate_logits: np.ndarray, unit_logits: list[np.ndarray]) -> bool:
        """Phase 3: one mixer upgrade paid for with the least confident kept units, if it ends closer to T."""
        kept = sorted(
            (float(unit_logits[b][i]), b, int(i)) for b, on in enumerate(self.units_on) for i in np.flatnonzero(on)
        )
        candidates = sorted(
            ((float(gate_logits[b, self.mixer[b]]), b) for b in range(len(self.mixer)) if self.mixer[b] < _NUM_GATES),
            reverse=True,
        )
        for _, block in candidates:
            index = self.mixer[block]
            upgraded = self._upgrade(block, index)
            extra = self.mixer_macs[block][upgraded] - self.mixer_macs[block][index]
            dropped, saved = [], 0
            for _, b, i in kept:
                if self.flops + extra - saved <= target:
                    break
                dropped.append((b, i))
                saved += self.unit_macs[b]
            new_flops = self.flops + extra - saved
            if self.flops < new_flops <= target:
                self.gates_on[block, index] = True
                self.mixer[block] = upgraded
                for b, i in dropped:
                    self.units_on[b][i] = False
                self.flops = new_flops
                return True
        return False

    def _upgrade(self, block: int, index: int) -> int:
        """The mixer index once the next gate `index` turns on: later gates already on join the leading run."""
        return index + 1 + int(mixer_indices(self.gates_on[block, index + 1 :]))

    def _push_next_gate(self, heap: list[tuple[float, int, int]], block: int, gate_logits: np.ndarray) -> None:
        index = self.mixer[block]
        if index < _NUM_GATES:
            heapq.heappush(heap, (-float(gate_logits[block, index]), -block, index))


def _write_flips(
    net: nn.Module,
    gates_before: np.ndarray,
    gates_after: np.ndarray,
    units_before: list[np.ndarray],
    units_after: list[np.ndarray],
    eps: float,
) -> None:
    """Set +eps / -eps on every gate whose state changed; leave every other logit untouched."""
    with torch.no_grad():
        for block, before, after in zip(net.blocks, gates_before, gates_after, strict=True):
            _set_flipped(block.attn.gates.logits, before, after, eps)
        for block, before, after in zip(net.blocks, units_before, units_after, strict=True):
            _set_flipped(block.mlp.gates.logits, before, after, eps)


def _set_flipped(logits: torch.Tensor, before: np.ndarray, after: np.ndarray, eps: float) -> None:
    changed = np.flatnonzero(before != after)
    if changed.size == 0:
        return
    values = np.where(after[changed], eps, -eps)
    index = torch.from_numpy(changed).to(logits.device)
    logits[index] = torch.from_numpy(values).to(device=logits.device, dtype=logits.dtype)

"""The differentiable cost of a supernet's current gates, priced by a lookup table: its MACs, or its predicted
latency (a latency table's)."""

from __future__ import annotations

import torch
from torch import nn

from .table import LookupTable

ESTIMATORS = ("threshold", "expected")


def gate_indicators(logits: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-gate 'on' indicators with a gradient to the logits.

    `threshold` (the paper's): exactly the deterministic rule logit > 0 in value, with the sigmoid's
    gradient passed straight through. `expected`: the keep probability sigmoid(logit) itself.
    """
    prob = torch.sigmoid(logits)
    if estimator == "expected":
        return prob
    if estimator == "threshold":
        return (logits > 0).to(prob.dtype) + (prob - prob.detach())
    raise ValueError(f"unknown estimator '{estimator}'; expected one of {', '.join(ESTIMATORS)}")


def differentiable_flops(net: nn.Module, lut: LookupTable, estimator: str = "threshold") -> torch.Tensor:
    """Total MACs of the architecture the gates describe, as a scalar with gradients to every gate: float64 (exact
    MACs counts) wherever the device has it, float32 on MPS. The table's constants are copied to the device once."""
    logits = [(b.attn.gates.logits, b.mlp.gates.logits) for b in net.blocks]
    device = logits[0][0].device
    steps, unit_macs, constant = _device_costs(lut, device)
    attn = gate_indicators(torch.stack([a for a, _ in logits]).to(steps.dtype), estimator)  # (depth, 3)
    # Mixer cost telescopes over the cumulative gates: skip + c1·(b1 - skip) + c3·(b3 - b1) + ca·(msa - b3).
    mixers = (torch.cumprod(attn, 1) * steps).sum()
    kept = torch.stack([gate_indicators(m.to(steps.dtype), estimator).sum() for _, m in logits])  # (depth,)
    return constant + mixers + (unit_macs * kept).sum()


def _device_costs(lut: LookupTable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixer cost steps (depth, 3), MACs per MLP unit (depth,), fixed MACs ()) on `device`, cached on the table:
    copying them every step would make the host wait for the device."""
    cache = lut.device_costs
    if device not in cache:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        mixer_macs = torch.tensor(lut.mixer_macs, dtype=torch.float64)  # (depth, 4)
        constant = float(lut.fixed_macs + lut.mlp_fixed_macs.sum() + lut.mixer_macs[:, 0].sum())
        costs = (mixer_macs.diff(dim=1), torch.tensor(lut.mlp_unit_macs, dtype=torch.float64), torch.tensor(constant))
        cache[device] = tuple(t.to(device, dtype) for t in costs)
    return cache[device]


def differentiable_latency(net: nn.Module, lut: LookupTable, estimator: str = "threshold") -> torch.Tensor:
    """The predicted ms of the architecture the gates describe, with gradients to every gate: the mixers telescoped
    over the cumulative gates as the MACs are, each MLP the table's curve at its kept width (value), with the slope
    of the curve's segment there (gradient). float64 wherever the device has it."""
    prediction = lut.latency_prediction
    if prediction is None:
        raise ValueError("the lookup table has no latency columns; measure one with `spvit lut --latency`")
    logits = [(b.attn.gates.logits, b.mlp.gates.logits) for b in net.blocks]
    device = logits[0][0].device
    steps, skip, curves = _device_latency(lut, device)
    attn = gate_indicators(torch.stack([a for a, _ in logits]).to(steps.dtype), estimator)  # (depth, 3)
    mixers = skip + (torch.cumprod(attn, 1) * steps).sum()
    mlp = []
    for (widths, times), (_, unit_logits) in zip(curves, logits, strict=True):
        kept = gate_indicators(unit_logits.to(steps.dtype), estimator).sum()
        k = (torch.searchsorted(widths, kept.detach().reshape(1), right=True) - 1).clamp(0, len(widths) - 2)
        slope = (times[k + 1] - times[k]) / (widths[k + 1] - widths[k])
        mlp.append(times[k] + slope * (kept - widths[k]))
    return prediction.scale * (prediction.fixed_ms + mixers + torch.cat(mlp).sum()) + prediction.offset


def _device_latency(lut: LookupTable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """(mixer latency steps (depth, 3), the skips' latency (), each block's MLP curve (widths, ms)) on `device`."""
    key = ("latency", device)
    cache = lut.device_costs
    if key not in cache:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        p = lut.latency_prediction
        depth = len(p.curves)
        mixers = torch.tensor(p.mixer_table(), dtype=torch.float64)
        curves = [tuple(torch.tensor(p.curves[i][:, c], dtype=dtype, device=device) for c in (0, 1)) for i in
                  range(depth)]  # fmt: skip
        cache[key] = (mixers.diff(dim=1).to(device, dtype), mixers[:, 0].sum().to(device, dtype), curves)
    return cache[key]

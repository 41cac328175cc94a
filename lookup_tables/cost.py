"""The differentiable MACs of a supernet's current gates, priced by a lookup table."""

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
    """Total MACs of the architecture the gates describe, as a float64 scalar with gradients to every gate."""
    device = net.gate_parameters()[0].device
    mixer_macs = torch.tensor(lut.mixer_macs, dtype=torch.float64, device=device)  # (depth, 4)
    # Mixer cost telescopes over the cumulative gates: skip + c1·(b1 - skip) + c3·(b3 - b1) + ca·(msa - b3).
    steps = mixer_macs.diff(dim=1)  # (depth, 3)
    total = torch.tensor(float(lut.fixed_macs + lut.mlp_fixed_macs.sum()), dtype=torch.float64, device=device)
    total = total + mixer_macs[:, 0].sum()
    for i, block in enumerate(net.blocks):
        cumulative = torch.cumprod(gate_indicators(block.attn.gates.logits.double(), estimator), 0)
        kept = gate_indicators(block.mlp.gates.logits.double(), estimator).sum()
        total = total + (cumulative * steps[i]).sum() + float(lut.mlp_unit_macs[i]) * kept
    return total

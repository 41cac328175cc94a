"""Binary gates with a straight-through binary-concrete estimator, and their configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..architecture import SKIP_MIXERS

_EPS = 1e-6


GATE_INITS = ("constant", "magnitude")
"""How a search starts its MLP gate logits: all at `GateConfig.init`, or spread by weight-magnitude rank around it
(`spvit_search.search.init_gates_from_magnitude`)."""


@dataclass(frozen=True)
class GateConfig:
    """How the search space's gates start and how they are sampled, and what its skip candidate computes; stored in
    run configs."""

    init: float = 1.5  # initial logit of every gate: sigmoid(1.5) ≈ 0.82 keep probability
    temperature: float = 1.0  # binary-concrete temperature of the training-time sampler
    head_mix_temperature: float = 0.01  # softmax temperature of the head-mixing logits z
    skip_mixer: str = "identity"  # or "affine": RIFormer's affine map of the normalised tokens (layers.affine_skip)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.head_mix_temperature <= 0:
            raise ValueError("gate temperatures must be positive")
        if self.skip_mixer not in SKIP_MIXERS:
            raise ValueError(f"skip_mixer: '{self.skip_mixer}' is not one of {', '.join(SKIP_MIXERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BinaryGates(nn.Module):
    """A vector of independent on/off gates, one learnable logit each.

    Training draws a relaxed Bernoulli sample (binary concrete) and rounds it, passing the gradient of
    the relaxed sample straight through; evaluation uses the deterministic rule logit > 0.
    """

    def __init__(self, num_gates: int, init: float = 1.5, temperature: float = 1.0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_gates,), float(init)))
        self.temperature = temperature
        self.generator: torch.Generator | None = None  # where training draws come from; None: the global RNG

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.is_on().to(self.logits.dtype)
        u = torch.rand(
            self.logits.shape, generator=self.generator, device=self.logits.device, dtype=self.logits.dtype
        ).clamp(_EPS, 1 - _EPS)
        soft = torch.sigmoid((self.logits + u.log() - (-u).log1p()) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        # Exactly `hard` in value (soft - soft.detach() is exactly 0), the relaxed sample's gradient.
        return hard + (soft - soft.detach())

    def is_on(self) -> torch.Tensor:
        return self.logits.detach() > 0

    def extra_repr(self) -> str:
        return f"{self.logits.numel()}, temperature={self.temperature}"

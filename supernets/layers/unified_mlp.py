"""Unified MLP: a transformer MLP with one gate per hidden unit, applied after the activation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .gates import BinaryGates, GateConfig


class UnifiedMlp(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        gates: GateConfig = GateConfig(),
    ) -> None:
        super().__init__()
        self.hidden_features = hidden_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)
        self.gates = BinaryGates(hidden_features, gates.init, gates.temperature)
        self.register_buffer("fixed_kept", None, persistent=False)  # sorted kept hidden indices

    @classmethod
    def from_timm(cls, mlp: Mlp, gates: GateConfig) -> UnifiedMlp:
        unified = cls(mlp.fc1.in_features, mlp.fc1.out_features, gates=gates)
        for name in ("fc1", "act", "drop1", "fc2", "drop2"):
            setattr(unified, name, copy.deepcopy(getattr(mlp, name)))
        return unified

    def kept_units(self) -> torch.Tensor:
        """Indices of the hidden units kept by the deterministic rule (gate logit > 0)."""
        return self.gates.is_on().nonzero().squeeze(1)

    def pruned_state(self, kept: tuple[int, ...], dim: int | None = None) -> dict[str, torch.Tensor]:
        """The state dict of the `PrunedMlp` that keeps hidden units `kept`, for tokens of width `dim` (default: the
        full width)."""
        index = torch.tensor(kept, dtype=torch.long, device=self.fc1.weight.device)
        state = {"fc1.weight": self.fc1.weight[index, :dim], "fc2.weight": self.fc2.weight[:dim, index]}  # (k,D) (D,k)
        if self.fc1.bias is not None:
            state["fc1.bias"] = self.fc1.bias[index]
        if self.fc2.bias is not None:
            state["fc2.bias"] = self.fc2.bias[:dim]
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        if self.fixed_kept is not None:
            return self._forward_kept(x, self.fixed_kept)
        if not self.training:
            return self._forward_kept(x, self.kept_units())
        h = self.drop1(self.act(self.fc1(x)))  # (B, N, hidden)
        # Gating fc2's input columns equals gating the hidden units, at the cost of a weight, not an activation.
        return self.drop2(F.linear(h, self.fc2.weight * self.gates(), self.fc2.bias))

    def _forward_kept(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        dim = int(x.shape[-1])  # slimmed tokens (a family's width search) use the first `dim` in and out channels
        if kept.numel() == self.hidden_features and dim == self.fc1.in_features:
            h = self.fc1(x)
            w2, b2 = self.fc2.weight, self.fc2.bias
        else:  # only the kept units are computed: sliced weights, so the saved work is real
            h = F.linear(x, self.fc1.weight[kept, :dim], None if self.fc1.bias is None else self.fc1.bias[kept])
            w2, b2 = self.fc2.weight[:dim, kept], None if self.fc2.bias is None else self.fc2.bias[:dim]
        h = self.drop1(self.act(h))  # (B, N, kept)
        return self.drop2(F.linear(h, w2, b2))

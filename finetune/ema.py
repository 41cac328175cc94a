"""An exponential moving average of a model's weights (DeiT's and timm's `--model-ema`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """`module` holds the average; floating-point parameters and buffers decay, integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in (0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current.detach(), 1.0 - self.decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

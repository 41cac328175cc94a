"""Learning-rate schedule: linear warmup, then cosine decay to a floor, stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr multiplier at `step`; a plain object so that LambdaLR's state_dict stores it as data."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(warmup_steps, self.total_steps - 1)
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio))

"""Budgets and the complexity loss that pulls the search to them.

Budgets are MACs, absolute (`3.2G`, `3200M`, `850K`, `1.2e9`), or milliseconds a latency table predicts (`12ms`),
or relative to the dense model in the search's metric (`0.7x`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_FORMS = ("paper", "normalized", "auto")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BUDGET = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([KMGT]?|x|ms)\s*$", re.IGNORECASE)


def budget_metric(text: str, metric: str) -> str:
    """The metric a budget is counted in: a budget in ms is latency whatever `metric` says, one in MACs is MACs."""
    match = _BUDGET.match(str(text))
    unit = match.group(2).lower() if match else ""
    if unit == "ms":
        return "latency"
    if unit != "x" and metric == "latency":
        raise ValueError(f"budget '{text}' is MACs, but --metric is latency: give milliseconds (12ms) or 0.6x")
    return metric


def relative_budget(text: str) -> bool:
    """Whether a budget is a fraction of the dense model's cost (`0.6x`)."""
    match = _BUDGET.match(str(text))
    return match is not None and match.group(2).lower() == "x"


def parse_budget(text: str, dense: float, metric: str = "macs") -> float:
    """The budget a string gives in `metric`: MACs (a whole number) or ms; `x` budgets are relative to `dense`, the
    dense model's cost in that metric."""
    match = _BUDGET.match(str(text))
    if match is None:
        raise ValueError(
            f"malformed budget '{text}': use MACs like 3.2G or 3200M, milliseconds like 12ms, or a fraction of "
            "dense like 0.7x"
        )
    value, unit = float(match.group(1)), match.group(2).lower()
    budget = value * (dense if unit == "x" else 1.0 if unit == "ms" else _UNITS[unit.upper()])
    if budget <= 0:
        raise ValueError(f"budget '{text}' must be positive")
    return round(budget) if metric == "macs" else budget


def check_budget(
    target: float,
    cost_range: tuple[float, float],
    text: str | None = None,
    number: Callable[[float], str] = lambda macs: f"{macs / 1e9:.4f}",
    unit: str = "GMACs",
) -> None:
    """Raise a `ValueError` that prints the search space's range (as `number` writes it, in `unit`) if `target` lies
    outside it."""
    low, high = cost_range
    if not low <= target <= high:
        asked = f"'{text}' = " if text else ""
        raise ValueError(
            f"budget {asked}{number(target)} {unit} is outside the search space's range "
            f"[{number(low)}, {number(high)}] {unit} ({low / high:.3f}x to 1.000x of the largest)"
        )


@dataclass
class ComplexityLoss:
    """Penalty on the distance between the current MACs F and the target T.

    - `paper`: λ·(T − F)² with T and F in GMACs, SPViT's form; λ must suit the model's size.
    - `normalized`: λ·((F − T)/T)², the same pull whatever the model's size.
    - `auto`: the normalized form with λ found by dual ascent on the constraint |F − T|/T ≤ tolerance,
      taken on log λ with the violation's sign: after every step λ grows by the factor e^lambda_lr
      while the architecture is off target and shrinks by it once inside the band. The factor makes
      the pull independent of the model's size and of how long the gates take to move.
    """

    target: int
    form: str = "auto"
    lam: float | torch.Tensor = 1.0  # a device tensor once `update` has taken a tensor
    lambda_lr: float = 0.02
    tolerance: float = 0.01
    lam_bounds: tuple[float, float] = (1e-3, 1e6)

    def __post_init__(self) -> None:
        if self.form not in LOSS_FORMS:
            raise ValueError(f"unknown complexity loss '{self.form}'; expected one of {', '.join(LOSS_FORMS)}")
        if self.target <= 0:
            raise ValueError("the complexity target must be positive")

    def __call__(self, flops: torch.Tensor) -> torch.Tensor:
        if self.form == "paper":
            return self.lam * ((self.target - flops) / 1e9) ** 2
        return self.lam * self.relative_error(flops) ** 2

    def relative_error(self, flops: torch.Tensor | float) -> torch.Tensor | float:
        return (flops - self.target) / self.target

    def update(self, flops: torch.Tensor | float) -> None:
        """One dual-ascent step on λ (only for `auto`), from the MACs of the step just taken. From a tensor, λ
        becomes a tensor on its device, so the step needs no host read."""
        if self.form != "auto":
            return
        grow, shrink = math.exp(self.lambda_lr), math.exp(-self.lambda_lr)
        if isinstance(flops, torch.Tensor):
            off_target = self.relative_error(flops.detach()).abs() > self.tolerance
            self.lam = (self.lam * torch.where(off_target, grow, shrink)).clamp(*self.lam_bounds)
            return
        off_target = abs(float(self.relative_error(flops))) > self.tolerance
        self.lam = min(max(self.lam * (grow if off_target else shrink), self.lam_bounds[0]), self.lam_bounds[1])

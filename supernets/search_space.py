"""Discrete search spaces for the Optuna strategy: choices without gates, sampled per trial.

A space turns an Optuna trial's suggestions into an `Architecture` (`suggest`) and rebuilds the same
architecture from a finished trial's parameters (`architecture`), so a study stores only the parameters.
`BlockwiseSpace` is every family's; a family with choices outside its blocks extends it in its folder
(`Family.search_space`). A trial is anything with Optuna's `suggest_categorical`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from .architecture import MIXERS, Architecture, BlockChoice

if TYPE_CHECKING:
    import optuna

    from .base import Supernet

DEFAULT_MLP_RATIOS = (0.25, 0.5, 0.75, 1.0)


class DiscreteSpace(Protocol):
    def suggest(self, trial: optuna.Trial) -> Architecture: ...

    def architecture(self, params: dict[str, Any]) -> Architecture: ...


class BlockwiseSpace:
    """Per block: the mixer, and the share of MLP hidden units kept (coarse ratios).

    The kept units of a ratio are the block's most important ones: by gate logit first (a searched
    supernet's gates rank them) and then by weight magnitude ‖fc1 row‖·‖fc2 column‖ (all logits are
    equal in a supernet fresh from a dense model).
    """

    def __init__(
        self,
        net: Supernet,
        mixers: Sequence[str] = MIXERS,
        mlp_ratios: Sequence[float] = DEFAULT_MLP_RATIOS,
    ) -> None:
        unknown = [m for m in mixers if m not in MIXERS]
        if unknown or not mixers:
            raise ValueError(f"mixers must be a non-empty subset of {', '.join(MIXERS)}; got {list(mixers)}")
        if not mlp_ratios or any(not 0.0 <= r <= 1.0 for r in mlp_ratios):
            raise ValueError(f"MLP ratios must lie in [0, 1]; got {list(mlp_ratios)}")
        self.net = net
        self.mixers = [m for m in MIXERS if m in mixers]  # cost order, whatever order was given
        self.mlp_ratios = sorted(set(float(r) for r in mlp_ratios))
        self.rankings = [unit_ranking(block.mlp) for block in net.blocks]

    def suggest(self, trial: optuna.Trial) -> Architecture:
        return self.architecture(self._suggest_blocks(trial, self.net.depth))

    def architecture(self, params: dict[str, Any]) -> Architecture:
        return self.net.architecture_of(self._blocks(params, self.net.depth))

    def _suggest_blocks(self, trial: optuna.Trial, depth: int) -> dict[str, Any]:
        """A mixer and an MLP ratio for each of the first `depth` blocks."""
        params = {}
        for i in range(depth):
            params[f"mixer.{i}"] = trial.suggest_categorical(f"mixer.{i}", self.mixers)
            params[f"mlp_ratio.{i}"] = trial.suggest_categorical(f"mlp_ratio.{i}", self.mlp_ratios)
        return params

    def _blocks(self, params: dict[str, Any], depth: int) -> tuple[BlockChoice, ...]:
        blocks = []
        for i, ranking in enumerate(self.rankings[:depth]):
            kept = ranking[: round(params[f"mlp_ratio.{i}"] * len(ranking))]
            blocks.append(BlockChoice(params[f"mixer.{i}"], tuple(sorted(kept))))
        return tuple(blocks)


@torch.no_grad()
def unit_ranking(mlp: torch.nn.Module) -> list[int]:
    """Hidden unit indices, most important first: gate logit, then ‖fc1 row‖·‖fc2 column‖, then index."""
    logits = mlp.gates.logits.detach().float().cpu().numpy()
    magnitude = unit_magnitude(mlp).float().cpu().numpy()
    order = np.lexsort((np.arange(len(logits)), -magnitude, -logits))  # last key sorts first
    return order.tolist()


def unit_magnitude(mlp: torch.nn.Module) -> torch.Tensor:
    """Each hidden unit's weight magnitude ‖fc1 row‖·‖fc2 column‖ (hidden,): the importance of magnitude pruning."""
    with torch.no_grad():
        return mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)

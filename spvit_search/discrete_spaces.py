"""Discrete search spaces for the Optuna strategy: choices without gates, sampled per trial.

A space turns an Optuna trial's suggestions into an `Architecture` (`suggest`) and rebuilds the same
architecture from a finished trial's parameters (`architecture`), so a study stores only the parameters.
`discrete_space` picks the space of a supernet's family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import optuna
import torch

from supernets import MIXERS, Architecture, BlockChoice, SReTSupernet, Supernet, T2TViTSupernet

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
        net = self.net
        return Architecture(net.name, net.img_size, net.num_classes, self._blocks(params, net.depth))

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


class T2TSpace(BlockwiseSpace):
    """`BlockwiseSpace` with T2T-ViT's depth and width: a trial first picks the depth and the number of heads
    (the width is heads × the head width), then a mixer and an MLP ratio for each block the subnet runs."""

    def __init__(
        self,
        net: T2TViTSupernet,
        mixers: Sequence[str] = MIXERS,
        mlp_ratios: Sequence[float] = DEFAULT_MLP_RATIOS,
    ) -> None:
        super().__init__(net, mixers, mlp_ratios)
        self.choices = net.discrete_choices()

    def suggest(self, trial: optuna.Trial) -> Architecture:
        params = {name: trial.suggest_categorical(name, self.choices[name]) for name in ("depth", "num_heads")}
        return self.architecture(params | self._suggest_blocks(trial, params["depth"]))

    def architecture(self, params: dict[str, Any]) -> Architecture:
        net, heads = self.net, params["num_heads"]
        blocks = self._blocks(params, params["depth"])
        return Architecture(
            net.name, net.img_size, net.num_classes, blocks, embed_dim=heads * net.head_dim, num_heads=heads
        )


class SReTSpace(BlockwiseSpace):
    """`BlockwiseSpace` with SReT's group splits: a trial picks the group count of every stage and pass (`groups.s.p`,
    any divisor of the stage's token count), then a mixer and an MLP ratio for each distinct block."""

    def __init__(
        self,
        net: SReTSupernet,
        mixers: Sequence[str] = MIXERS,
        mlp_ratios: Sequence[float] = DEFAULT_MLP_RATIOS,
    ) -> None:
        super().__init__(net, mixers, mlp_ratios)
        offered = net.discrete_choices()["groups"]  # per stage and pass, the group counts
        self.passes = [len(stage) for stage in offered]
        self.group_options = {
            f"groups.{s}.{p}": options for s, stage in enumerate(offered) for p, options in enumerate(stage)
        }

    def suggest(self, trial: optuna.Trial) -> Architecture:
        params = {name: trial.suggest_categorical(name, options) for name, options in self.group_options.items()}
        return self.architecture(params | self._suggest_blocks(trial, self.net.depth))

    def architecture(self, params: dict[str, Any]) -> Architecture:
        groups = tuple(tuple(params[f"groups.{s}.{p}"] for p in range(n)) for s, n in enumerate(self.passes))
        return dataclasses.replace(super().architecture(params), groups=groups)


def discrete_space(
    net: Supernet, mixers: Sequence[str] = MIXERS, mlp_ratios: Sequence[float] = DEFAULT_MLP_RATIOS
) -> BlockwiseSpace:
    """The Optuna space of `net`'s family: T2T-ViT's adds depth and width to the blockwise choices, SReT's the
    group splits."""
    spaces = {T2TViTSupernet: T2TSpace, SReTSupernet: SReTSpace}
    space = next((s for family, s in spaces.items() if isinstance(net, family)), BlockwiseSpace)
    return space(net, mixers, mlp_ratios)


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

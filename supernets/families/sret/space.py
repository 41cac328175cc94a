"""SReT's Optuna space: group splits on top of the blockwise choices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...architecture import Architecture
from ...search_space import BlockwiseSpace

if TYPE_CHECKING:
    import optuna

    from .supernet import SReTSupernet


class SReTSpace(BlockwiseSpace):
    """`BlockwiseSpace` with SReT's group splits: a trial picks the group count of every stage and pass (`groups.s.p`,
    any divisor of the stage's token count), then a mixer and an MLP ratio for each distinct block."""

    net: SReTSupernet

    def suggest(self, trial: optuna.Trial) -> Architecture:
        offered = self.net.discrete_choices()["groups"]  # per stage and pass, the group counts
        params = {
            f"groups.{s}.{p}": trial.suggest_categorical(f"groups.{s}.{p}", options)
            for s, stage in enumerate(offered)
            for p, options in enumerate(stage)
        }
        return self.architecture(params | self._suggest_blocks(trial, self.net.depth))

    def architecture(self, params: dict[str, Any]) -> Architecture:
        passes = [len(stage) for stage in self.net.discrete_choices()["groups"]]
        groups = tuple(tuple(params[f"groups.{s}.{p}"] for p in range(n)) for s, n in enumerate(passes))
        return super().architecture(params).with_extras(groups=groups)

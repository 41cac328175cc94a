"""T2T-ViT's Optuna space: depth and width on top of the blockwise choices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...architecture import Architecture
from ...search_space import BlockwiseSpace

if TYPE_CHECKING:
    import optuna

    from .supernet import T2TViTSupernet


class T2TSpace(BlockwiseSpace):
    """`BlockwiseSpace` with T2T-ViT's depth and width: a trial first picks the depth and the number of heads
    (the width is heads × the head width), then a mixer and an MLP ratio for each block the subnet runs."""

    net: T2TViTSupernet

    def suggest(self, trial: optuna.Trial) -> Architecture:
        choices = self.net.discrete_choices()
        params = {name: trial.suggest_categorical(name, choices[name]) for name in ("depth", "num_heads")}
        return self.architecture(params | self._suggest_blocks(trial, params["depth"]))

    def architecture(self, params: dict[str, Any]) -> Architecture:
        net, heads = self.net, params["num_heads"]
        blocks = self._blocks(params, params["depth"])
        extras = {"embed_dim": heads * net.head_dim, "num_heads": heads}
        return net.architecture_of(blocks, extras)

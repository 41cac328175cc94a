"""The Optuna strategy's discrete spaces: `discrete_space` asks a supernet's family for its own."""

from __future__ import annotations

from collections.abc import Sequence

from supernets import MIXERS, Supernet
from supernets.family import family_of
from supernets.search_space import DEFAULT_MLP_RATIOS, BlockwiseSpace, DiscreteSpace, unit_magnitude, unit_ranking

__all__ = ["DEFAULT_MLP_RATIOS", "BlockwiseSpace", "DiscreteSpace", "discrete_space", "unit_magnitude", "unit_ranking"]


def discrete_space(
    net: Supernet, mixers: Sequence[str] = MIXERS, mlp_ratios: Sequence[float] = DEFAULT_MLP_RATIOS
) -> BlockwiseSpace:
    """The Optuna space of `net`'s family."""
    return family_of(net).search_space(net, mixers, mlp_ratios)

"""The SReT family: our `SReT` (timm has none), its recursive blocks searched once each and its group splits
chosen per stage and pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...family import Family, register_family
from .schema import ARCHITECTURE_FIELDS
from .space import SReTSpace
from .sret import SReT, sret_checkpoint_filter, sret_variants
from .subnet import SReTSubnet
from .supernet import SReTSupernet


class SReTFamily(Family):
    supernet_class = SReTSupernet
    subnet_class = SReTSubnet
    source_classes = (SReT,)
    architecture_fields = ARCHITECTURE_FIELDS

    def structure_kwargs(self, name: str) -> dict[str, Any]:
        return {}  # depth is per stage, and a whole SReT is small

    def checkpoint_filter(self, state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        return sret_checkpoint_filter(state, model)

    def model_names(self) -> list[str]:
        return sorted(sret_variants())

    def search_space(self, net: SReTSupernet, mixers: Iterable[str], mlp_ratios: Iterable[float]) -> SReTSpace:
        return SReTSpace(net, mixers, mlp_ratios)

    def extra_msa_passes(self, net: SReTSupernet, index: int) -> list[tuple[str, int, dict[str, Any]]]:
        """Group splits change the msa's attention matmuls (÷G): block `index`'s msa on each pass at every group
        count the pass offers, selected by the architecture's `groups[s][p]=G`."""
        stage = net.block_stages[index]
        offered = net.discrete_choices()["groups"][stage]
        return [
            (f"groups[{stage}][{step}]={groups}", step, kwargs | {"groups": groups})
            for step, (options, kwargs) in enumerate(zip(offered, net.block_passes(index), strict=True))
            for groups in options
        ]


FAMILY = register_family(SReTFamily())

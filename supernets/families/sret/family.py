"""The SReT family: our `SReT` (timm has none), its recursive blocks searched once each and its group splits
chosen per stage and pass."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ...architecture import Architecture
from ...family import Family, register_family
from .schema import ARCHITECTURE_FIELDS
from .space import SReTSpace
from .sret import SReT, sret_checkpoint_filter, sret_variants
from .subnet import SReTSubnet
from .supernet import SReTSupernet

_GROUP_CHOICE = re.compile(r"groups\[(\d+)\]\[(\d+)\]=(\d+)")  # an extra msa row's `choice`: stage, pass, G


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

    def extra_block_rows(
        self, net: SReTSupernet, index: int, measure: Callable[[dict[str, Any]], int], msa_macs: int
    ) -> list[dict[str, Any]]:
        """Group splits change the msa's attention matmuls (÷G): block `index`'s msa on each pass at every group
        count the pass offers, one row each, named `groups[s][p]=G`."""
        stage = net.block_stages[index]
        offered = net.discrete_choices()["groups"][stage]
        rows, own = [], 0
        for step, (options, kwargs) in enumerate(zip(offered, net.block_passes(index), strict=True)):
            for groups in options:
                macs = measure(kwargs | {"groups": groups})
                rows.append({"choice": f"groups[{stage}][{step}]={groups}", "macs": macs, "params": 0})
                own += macs if groups == kwargs["groups"] else 0
        if own != msa_macs:
            raise RuntimeError(f"block {index}: msa costs {msa_macs} MACs, but its passes {own} at the same groups")
        return rows

    def dearest_msa(self, rows: Mapping[str, int]) -> int:
        """Every pass at its dearest group count."""
        dearest: dict[tuple[int, int], int] = {}
        for choice, macs in rows.items():
            stage, step, _ = _parse_group_choice(choice)
            dearest[stage, step] = max(dearest.get((stage, step), 0), macs)
        return sum(dearest.values())

    def msa_row_choices(self, arch: Architecture, index: int, offered: Iterable[str]) -> list[str] | None:
        """The rows of each pass at the architecture's group count for it."""
        if arch.groups is None:
            return None
        chosen = []
        for choice in offered:
            stage, step, groups = _parse_group_choice(choice)
            if arch.groups[stage][step] == groups:
                chosen.append(choice)
        return chosen


def _parse_group_choice(choice: str) -> tuple[int, int, int]:
    """(stage, pass, G) of an extra msa row's `choice` `groups[s][p]=G`."""
    match = _GROUP_CHOICE.fullmatch(choice)
    if match is None:
        raise ValueError(f"extra msa row '{choice}' is not groups[s][p]=G")
    stage, step, groups = map(int, match.groups())
    return stage, step, groups


FAMILY = register_family(SReTFamily())

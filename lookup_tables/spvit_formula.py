"""The `spvit` convention: the SPViT papers' cost formula of a family (`Family.spvit_costs`) as lookup-table rows,
which reproduce their published MACs; parameters are counted from the real modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from supernets.family import family_of

from .counting import fixed_rows


def spvit_rows(net: nn.Module) -> list[dict[str, Any]]:
    """Lookup-table rows of `net` in the `spvit` convention."""
    costs = family_of(net).spvit_costs(net)
    if costs is None:
        raise ValueError(
            f"the spvit convention is the SPViT papers' formula, which has no form for '{net.name}'; price it with "
            "fvcore or core"
        )
    rows = fixed_rows(net, costs.fixed)
    for i, block in enumerate(net.blocks):
        for mixer, macs in costs.mixers[i].items():
            params = sum(p.numel() for p in block.mixer_parameters(mixer))
            rows.append(dict(block=i, item="mixer", choice=mixer, macs=macs, params=params))
        fixed_params, unit_params = block.mlp_parameter_counts()
        hidden = block.mlp.hidden_features
        rows.append(dict(block=i, item="mlp_fixed", choice="", macs=costs.mlp_fixed[i], params=fixed_params))
        rows.append(dict(block=i, item="mlp_unit", choice="", macs=costs.mlp_unit[i], params=unit_params, units=hidden))
    return rows

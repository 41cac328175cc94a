"""The SPViT paper's cost formula for DeiT/ViT, which reproduces its published MACs.

N patch tokens, T = N + prefix tokens, D width, d head width, p patch size, C classes:
patch embedding N·D·3·p², head D·C, two LayerNorms 2·D·T per block (whatever the choices),
msa 4·T·D² + 2·D·T², bconv1 2·D·d·N, bconv3 (9·D·d + d·D)·N, skip 0, MLP 2·N·D per kept unit.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from supernets.family import family_of

from .counting import fixed_rows


def spvit_rows(net: nn.Module) -> list[dict[str, Any]]:
    """Lookup-table rows in the `spvit` convention (parameters are counted from the real modules)."""
    if not family_of(net).spvit_formula:  # a family whose layers the formula does not describe
        raise ValueError(
            f"the spvit convention is the SPViT paper's formula for DeiT/ViT; price '{net.name}' with fvcore or core"
        )
    n = net.grid_size[0] * net.grid_size[1]
    t = n + net.num_prefix_tokens
    dim, patch = net.embed_dim, net.patch_embed.patch_size[0]
    in_chans = net.patch_embed.proj.in_channels
    rows = fixed_rows(net, {"patch_embed": n * dim * in_chans * patch * patch, "head": dim * net.num_classes})
    for i, block in enumerate(net.blocks):
        d = block.attn.head_dim
        macs = {
            "skip": 0,
            "bconv1": 2 * dim * d * n,
            "bconv3": (9 * dim * d + d * dim) * n,
            "msa": 4 * t * dim * dim + 2 * dim * t * t,
        }
        for mixer, m in macs.items():
            params = sum(p.numel() for p in block.mixer_parameters(mixer))
            rows.append(dict(block=i, item="mixer", choice=mixer, macs=m, params=params))
        fixed_params, unit_params = block.mlp_parameter_counts()
        norms = 2 * dim * t  # both LayerNorms of the block, whatever its choices
        rows.append(dict(block=i, item="mlp_fixed", choice="", macs=norms, params=fixed_params))
        rows.append(
            dict(
                block=i,
                item="mlp_unit",
                choice="",
                macs=2 * n * dim,
                params=unit_params,
                units=block.mlp.hidden_features,
            )
        )
    return rows

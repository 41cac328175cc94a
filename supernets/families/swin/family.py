"""The Swin family: timm's `SwinTransformer`, searched block by block across its stages."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_filter
from torch import nn

from ...family import Family, FormulaCosts, register_family
from .subnet import SwinSubnet
from .supernet import SwinSupernet, unsupported_swin_features


class SwinFamily(Family):
    supernet_class = SwinSupernet
    subnet_class = SwinSubnet
    source_classes = (SwinTransformer,)
    timm_modules = ("swin_transformer",)

    def unsupported(self, model: nn.Module) -> list[str]:
        return unsupported_swin_features(model)

    def structure_kwargs(self, name: str) -> dict[str, Any]:
        return {}  # depth is per stage

    def checkpoint_filter(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return timm_swin_filter(state, model)

    def spvit_costs(self, net: SwinSupernet) -> FormulaCosts:
        """SPViT's Swin `flops()`: multiply-adds; a LayerNorm at 1 per element; both attention matmuls; bconv_k
        (k²·C·d + d·C)·H·W with d = C/heads; the MLP 2·H·W·C per kept unit; the patch merging and the head; and
        the final norm charged for the first stage's tokens / 2^stages (196 at 224, where 49 are normed)."""
        gh, gw = net.grid_size
        embed = net.patch_embed
        patch = embed.patch_size[0] * embed.patch_size[1]
        stem = gh * gw * net.embed_dim * (net.in_chans * patch + (not isinstance(embed.norm, nn.Identity)))
        merges = 0
        for merge in net.downsamples:
            if not isinstance(merge, nn.Identity):  # (H, W, C) -> (H/2, W/2, 2C): its norm, then 4C -> 2C
                tokens = gh * gw  # the grid before merging
                merges += tokens * merge.dim + (tokens // 4) * 4 * merge.dim * merge.out_dim
                gh, gw = gh // 2, gw // 2
        first = net.grid_size[0] * net.grid_size[1]
        fixed = {
            "patch_embed": stem,
            "downsamples": merges,
            "norm": net.num_features * first // 2 ** len(net.stage_depths),
            "head": net.num_features * net.num_classes,
        }
        mixers, mlp_fixed, mlp_unit = [], [], []
        for block in net.blocks:
            attn = block.attn
            dim, heads = attn.v.in_features, attn.num_heads
            tokens = attn.grid_size[0] * attn.grid_size[1]
            n = attn.window_size[0] * attn.window_size[1]
            d = dim // heads
            mixers.append({
                "skip": 0,
                "bconv1": (dim * d + d * dim) * tokens,
                "bconv3": (9 * dim * d + d * dim) * tokens,
                "msa": (tokens // n) * (4 * n * dim * dim + 2 * n * n * dim),
            })  # fmt: skip
            mlp_fixed.append(2 * dim * tokens)  # both LayerNorms, whatever the choices
            mlp_unit.append(2 * tokens * dim)
        return FormulaCosts(fixed, mixers, mlp_fixed, mlp_unit)


FAMILY = register_family(SwinFamily())

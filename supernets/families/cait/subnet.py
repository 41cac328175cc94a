"""`CaitSubnet`, a CaiT exported for one `Architecture`: timm's stem, class-attention blocks and head around
self-attention blocks that hold the chosen mixers and pruned MLPs, with no LayerScale left.

Each SA branch of CaiT ends in a linear layer (the attention's or bconv's projection, the MLP's fc2) followed by
LayerScale, γ·(W·h + b) = (γ·W)·h + γ·b; export folds γ into that layer's weight and bias, so the blocks here
have no layer scales. It lives apart from `cait` because it builds on `subnet` and the registry, which imports
`cait`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.cait import LayerScaleBlock, TalkingHeadAttn
from torch import nn

from ...architecture import Architecture, BlockChoice
from ...base import Subnet
from ...layers.plain import PlainAttention, PrunedMlp, SubnetBlock, plain_mixer
from .supernet import CaitStemAndHead, talking_heads_attention


class TalkingHeadsAttention(PlainAttention):
    """Talking-heads self-attention (the msa choice of a CaiT block): timm's `TalkingHeadAttn`, laid out as
    `PlainAttention` (a fused qkv projection) plus the head-mixing layers proj_l and proj_w."""

    def __init__(self, dim: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.proj_l = nn.Linear(num_heads, num_heads)  # mixes the heads' attention logits
        self.proj_w = nn.Linear(num_heads, num_heads)  # mixes the heads' attention weights

    @classmethod
    def from_timm(cls, attn: TalkingHeadAttn) -> TalkingHeadsAttention:
        return cls(
            attn.qkv.in_features,
            attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
        )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return talking_heads_attention(q, k, v, self.proj_l, self.proj_w, self.attn_drop, self.training)


def cait_subnet_block(
    block: LayerScaleBlock, choice: BlockChoice, grid_size: tuple[int, int], fold_bn: bool, skip_mixer: str
) -> SubnetBlock:
    """CaiT's `LayerScaleBlock` for one `BlockChoice`, its layer scales folded into the branches' last linear
    layers (so none is left): talking-heads attention (msa), a bottleneck conv over all tokens (bconv1, bconv3) or
    no mixer branch at all (skip), and a pruned MLP. Takes over `block`'s norms and drop path (pass a model built
    for the purpose)."""
    attn = block.attn
    talking_heads = lambda: TalkingHeadsAttention.from_timm(attn)  # noqa: E731
    mixer = plain_mixer(choice, attn, grid_size, 0, fold_bn, talking_heads, skip_mixer)
    mlp = PrunedMlp.from_timm(block.mlp, len(choice.mlp_kept))
    drop_path = block.drop_path
    return SubnetBlock(mixer, block.norm1, nn.Identity(), drop_path, block.norm2, nn.Identity(), drop_path, mlp)


class CaitSubnet(CaitStemAndHead, Subnet):
    """The exported CaiT: timm's stem, class token, class-attention blocks and head around the SA blocks of one
    `Architecture`. The timm model `arch.model` is created for its structure (`Subnet.create_source`)."""

    family = "cait"

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        super().__init__()
        cait = self.create_source(arch, model_kwargs, fold_bn)
        self.adopt_stem_and_head(cait, arch.model)
        self.blocks = nn.Sequential(
            *[
                cait_subnet_block(block, choice, self.grid_size, fold_bn, arch.skip_mixer)
                for block, choice in zip(cait.blocks, arch.blocks, strict=True)
            ]
        )

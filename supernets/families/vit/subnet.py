"""`VisionTransformerSubnet`: the exported DeiT/ViT, timm's stem, tokens, norms and head around plain blocks.

No gates and no search code: its blocks hold what one `Architecture` chose, standard attention (msa), a
bottleneck convolution (bconv1, bconv3) or no token mixer at all (skip), and an MLP cut to its kept hidden
units. It is built from data alone, the architecture plus a small config (the source model's timm kwargs,
whether BN is folded), so that loading a saved subnet needs no supernet; its weights then come by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...architecture import Architecture
from ...base import Subnet
from ...layers.plain import SubnetBlock
from .supernet import ViTStemAndHead


class VisionTransformerSubnet(ViTStemAndHead, Subnet):
    """The exported subnet: timm's stem, tokens, norms and head around the blocks of one `Architecture`.

    The timm model `arch.model` is created (`Subnet.create_source`) for its structure; its stem and head
    are taken over and each block is rebuilt for its choice. `fold_bn` builds the inference form of the
    bconv layers (no BN, a conv bias); `config()` and the architecture rebuild the same modules.
    """

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        super().__init__()
        vit = self.create_source(arch, model_kwargs, fold_bn)
        self.adopt_stem_and_head(vit, arch.model)
        self.blocks = nn.Sequential(
            *[
                SubnetBlock.from_timm(block, choice, self.grid_size, self.num_prefix_tokens, fold_bn, arch.skip_mixer)
                for block, choice in zip(vit.blocks, arch.blocks, strict=True)
            ]
        )

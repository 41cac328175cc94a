"""The T2T-ViT family: our `T2TViT` (timm has none), searched in depth and embedding width as well as per block."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ...architecture import Architecture, BlockChoice
from ...family import Family, register_family
from .schema import ARCHITECTURE_FIELDS
from .space import T2TSpace
from .subnet import T2TViTSubnet
from .supernet import T2TSuperBlock, T2TViTSupernet
from .t2t_vit import T2TViT


class T2TViTFamily(Family):
    supernet_class = T2TViTSupernet
    subnet_class = T2TViTSubnet
    source_classes = (T2TViT,)
    architecture_fields = ARCHITECTURE_FIELDS

    def stem_and_head_state(self, net: T2TViTSupernet, arch: Architecture) -> dict[str, torch.Tensor]:
        """The first `arch.embed_dim` channels of the stem, tokens, norm and head."""
        return net.stem_and_head_state(arch.embed_dim)

    def block_state(self, block: T2TSuperBlock, choice: BlockChoice, arch: Architecture) -> dict[str, torch.Tensor]:
        """The block's state for `choice`, at the first `arch.embed_dim` channels."""
        return block.subnet_state(choice, arch.embed_dim)

    def search_space(self, net: T2TViTSupernet, mixers: Iterable[str], mlp_ratios: Iterable[float]) -> T2TSpace:
        return T2TSpace(net, mixers, mlp_ratios)

    def table_widths(self, net: T2TViTSupernet) -> list[int]:
        return net.discrete_choices()["embed_dim"]

    def smallest_architecture(self, net: T2TViTSupernet, width: int) -> Architecture:
        return net.dense_architecture(width)


FAMILY = register_family(T2TViTFamily())

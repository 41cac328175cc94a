"""The DeiT/ViT family: timm's `VisionTransformer` (and DeiT's), searched block by block."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...family import Family, FormulaCosts, register_family
from .spvit_formula import vit_spvit_costs
from .subnet import VisionTransformerSubnet
from .supernet import VisionTransformerSupernet, unsupported_features


class ViTFamily(Family):
    supernet_class = VisionTransformerSupernet
    subnet_class = VisionTransformerSubnet
    source_classes = (VisionTransformer,)
    timm_modules = ("vision_transformer", "deit")

    def unsupported(self, model: nn.Module) -> list[str]:
        return unsupported_features(model)

    def spvit_costs(self, net: VisionTransformerSupernet) -> FormulaCosts:
        return vit_spvit_costs(net)


FAMILY = register_family(ViTFamily())

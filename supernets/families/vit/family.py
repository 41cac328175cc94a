"""The DeiT/ViT family: timm's `VisionTransformer` (and DeiT's), searched block by block."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...family import Family, register_family
from .subnet import VisionTransformerSubnet
from .supernet import VisionTransformerSupernet, unsupported_features


class ViTFamily(Family):
    supernet_class = VisionTransformerSupernet
    subnet_class = VisionTransformerSubnet
    source_classes = (VisionTransformer,)
    timm_modules = ("vision_transformer", "deit")
    spvit_formula = True

    def unsupported(self, model: nn.Module) -> list[str]:
        return unsupported_features(model)


FAMILY = register_family(ViTFamily())

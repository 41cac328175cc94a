"""The CaiT family: timm's `Cait`, its self-attention blocks searched, its class-attention blocks kept."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.cait import Cait
from torch import nn

from ...family import Family, register_family
from .subnet import CaitSubnet
from .supernet import CaitSupernet, cait_checkpoint_filter, unsupported_cait_features


class CaitFamily(Family):
    supernet_class = CaitSupernet
    subnet_class = CaitSubnet
    source_classes = (Cait,)

    def unsupported(self, model: nn.Module) -> list[str]:
        return unsupported_cait_features(model)

    def checkpoint_filter(self, state: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        return cait_checkpoint_filter(state, model)


FAMILY = register_family(CaitFamily())

"""The search space: `Architecture`, gated layers and the supernet families."""

from .architecture import MIXERS, Architecture, BlockChoice
from .gates import BinaryGates, GateConfig
from .registry import build_supernet, check_model_name, list_supernets
from .sret import SReT  # importing registers sret_t, sret_lt and sret_s with timm
from .subnet import VisionTransformerSubnet
from .t2t_vit import T2TViT  # importing registers t2t_vit_{7,10,12,14,19,24} and t2t_vit_t_{14,19,24} with timm
from .unified_attention import UnifiedAttention
from .unified_mlp import UnifiedMlp
from .vit import SuperBlock, VisionTransformerSupernet

__all__ = [
    "MIXERS",
    "SReT",
    "T2TViT",
    "Architecture",
    "BinaryGates",
    "BlockChoice",
    "GateConfig",
    "SuperBlock",
    "UnifiedAttention",
    "UnifiedMlp",
    "VisionTransformerSubnet",
    "VisionTransformerSupernet",
    "build_supernet",
    "check_model_name",
    "list_supernets",
]

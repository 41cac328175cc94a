"""The search space: `Architecture`, gated layers and the supernet families."""

from .architecture import MIXERS, Architecture, BlockChoice
from .gates import BinaryGates, GateConfig
from .registry import build_supernet, check_model_name, list_supernets
from .sret import SReT  # importing registers sret_t, sret_lt and sret_s with timm
from .subnet import VisionTransformerSubnet
from .unified_attention import UnifiedAttention
from .unified_mlp import UnifiedMlp
from .vit import SuperBlock, VisionTransformerSupernet

__all__ = [
    "MIXERS",
    "SReT",
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

"""The search space: `Architecture`, gated layers and the supernet families."""

from .architecture import MIXERS, Architecture, BlockChoice
from .cait import CaitSupernet
from .cait_subnet import CaitSubnet
from .gates import BinaryGates, GateConfig
from .registry import build_supernet, check_model_name, list_supernets
from .sret import SReT  # importing registers sret_t, sret_lt and sret_s with timm
from .sret_subnet import SReTSubnet
from .sret_supernet import SReTSupernet
from .subnet import Subnet, VisionTransformerSubnet
from .t2t_subnet import T2TViTSubnet
from .t2t_supernet import T2TViTSupernet
from .t2t_vit import T2TViT  # importing registers t2t_vit_{7,10,12,14,19,24} and t2t_vit_t_{14,19,24} with timm
from .unified_attention import UnifiedAttention
from .unified_mlp import UnifiedMlp
from .vit import SuperBlock, Supernet, VisionTransformerSupernet

__all__ = [
    "MIXERS",
    "SReT",
    "SReTSubnet",
    "SReTSupernet",
    "T2TViT",
    "Architecture",
    "BinaryGates",
    "BlockChoice",
    "CaitSubnet",
    "CaitSupernet",
    "GateConfig",
    "Subnet",
    "SuperBlock",
    "Supernet",
    "T2TViTSubnet",
    "T2TViTSupernet",
    "UnifiedAttention",
    "UnifiedMlp",
    "VisionTransformerSubnet",
    "VisionTransformerSupernet",
    "build_supernet",
    "check_model_name",
    "list_supernets",
]

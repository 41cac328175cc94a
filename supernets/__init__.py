"""The search space: `Architecture`, the shared gated and plain layers, and one folder per model family."""

from . import families  # noqa: F401  (importing it registers every family, and our own timm entry points)
from .architecture import MIXERS, Architecture, BlockChoice
from .base import Subnet, Supernet
from .families.cait.subnet import CaitSubnet
from .families.cait.supernet import CaitSupernet
from .families.sret.sret import SReT
from .families.sret.subnet import SReTSubnet
from .families.sret.supernet import SReTSupernet
from .families.t2t_vit.subnet import T2TViTSubnet
from .families.t2t_vit.supernet import T2TViTSupernet
from .families.t2t_vit.t2t_vit import T2TViT
from .families.vit.subnet import VisionTransformerSubnet
from .families.vit.supernet import VisionTransformerSupernet
from .family import Family, family_of, register_family, registered_families
from .layers.gates import BinaryGates, GateConfig
from .layers.super_block import SuperBlock
from .layers.unified_attention import UnifiedAttention
from .layers.unified_mlp import UnifiedMlp
from .registry import build_supernet, check_model_name, list_supernets

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
    "Family",
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
    "family_of",
    "list_supernets",
    "registered_families",
    "register_family",
]

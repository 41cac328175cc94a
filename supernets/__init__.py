"""The search space: `Architecture`, the shared gated and plain layers, and one folder per model family.

The names below load on first use (PEP 562), so that the torch-free contract (`supernets.architecture`, which the
reports read) imports without torch. Asking for any of the families' names registers every family, and the models we
define ourselves with timm.
"""

from __future__ import annotations

import importlib

from .lazy import lazy_exports

# Each public name and the module that defines it.
_EXPORTS = {
    "MIXERS": "architecture",
    "Architecture": "architecture",
    "BlockChoice": "architecture",
    "Subnet": "base",
    "Supernet": "base",
    "Family": "family",
    "family_of": "family",
    "register_family": "family",
    "registered_families": "family",
    "BinaryGates": "layers.gates",
    "GateConfig": "layers.gates",
    "SuperBlock": "layers.super_block",
    "UnifiedAttention": "layers.unified_attention",
    "UnifiedMlp": "layers.unified_mlp",
    "build_supernet": "registry",
    "check_model_name": "registry",
    "list_supernets": "registry",
    "CaitSubnet": "families.cait.subnet",
    "CaitSupernet": "families.cait.supernet",
    "SReT": "families.sret.sret",
    "SReTSubnet": "families.sret.subnet",
    "SReTSupernet": "families.sret.supernet",
    "T2TViT": "families.t2t_vit.t2t_vit",
    "T2TViTSubnet": "families.t2t_vit.subnet",
    "T2TViTSupernet": "families.t2t_vit.supernet",
    "VisionTransformerSubnet": "families.vit.subnet",
    "VisionTransformerSupernet": "families.vit.supernet",
}
__all__ = sorted(_EXPORTS)


def _register_families(module: str) -> None:
    if module != "architecture":
        importlib.import_module(f"{__name__}.family").registered_families()


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _register_families)

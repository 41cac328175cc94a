"""What the timm entry points of our own families (T2T-ViT, SReT) share: no weights to download."""

from __future__ import annotations

from typing import Any

# Passed by timm.create_model to every entry point; meaningless for a model without released weights here.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def constructor_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any], weights_note: str = "") -> dict[str, Any]:
    """`kwargs` without timm's bookkeeping; `pretrained=True` is a `ValueError` (with `weights_note` appended)."""
    if pretrained:
        raise ValueError(
            f"{name}: pretrained weights are not downloaded by spvit-search; build with pretrained=False "
            f"and load a checkpoint (checkpoint_path=... or load_state_dict){weights_note}"
        )
    return {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY_KWARGS}

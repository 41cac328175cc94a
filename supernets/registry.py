"""`build_supernet` and `list_supernets`: from a model name (and weights) to a searchable supernet."""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from typing import Any

import timm
import torch
from timm.models.cait import Cait
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .cait import CaitSupernet, cait_checkpoint_filter, unsupported_cait_features
from .gates import GateConfig
from .io import load_state_dict_file
from .sret import SReT, sret_checkpoint_filter, sret_variants
from .sret_supernet import SReTSupernet
from .t2t_supernet import T2TViTSupernet
from .t2t_vit import T2TViT
from .vit import Supernet, VisionTransformerSupernet, unsupported_features

# timm modules whose models may be plain VisionTransformers, CaiTs or our T2T-ViTs and SReTs; each name is then
# checked by building it.
_VIT_MODULES = ("vision_transformer", "deit", "cait", "t2t_vit", "sret")


def _unsupported(model: nn.Module) -> list[str]:
    """Why `model` cannot become a supernet: a CaiT is checked as one, any other model as a ViT; every T2T-ViT and
    SReT can."""
    if isinstance(model, T2TViT | SReT):
        return []
    return unsupported_cait_features(model) if isinstance(model, Cait) else unsupported_features(model)


@functools.cache
def list_supernets() -> list[str]:
    """Every model name `build_supernet` accepts."""
    names = []
    for name in sorted({n for m in _VIT_MODULES for n in timm.list_models(module=m)}):
        # One block on the meta device shows the structure without allocating weights. SReT's depth is per stage;
        # a whole SReT is small.
        structure = {} if name in sret_variants() else {"depth": 1}
        try:
            with torch.device("meta"):
                model = timm.create_model(name, **structure)
        except Exception:  # an entry point that cannot build this way is not a plain ViT
            continue
        if not _unsupported(model):
            names.append(name)
    return names


def check_model_name(name: str) -> None:
    """Raise a `ValueError` that suggests close matches, or says why, if `name` cannot be a supernet."""
    if name in timm.list_models():
        with torch.device("meta"):  # the structure, without allocating weights
            reasons = _unsupported(timm.create_model(name))
        if reasons:
            raise ValueError(f"timm model '{name}' cannot be searched: {'; '.join(reasons)}")
        return
    supported = list_supernets()
    close = difflib.get_close_matches(name, supported, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model '{name}'{hint} (list_supernets() lists all {len(supported)})")


def build_supernet(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    gates: GateConfig | None = None,
    **kwargs: Any,
) -> Supernet:
    """Build timm's `name` (random, `pretrained` or from `checkpoint_path`) and convert it to a supernet.

    Extra keyword arguments (e.g. `patch_size=4`) go to `timm.create_model`.
    """
    check_model_name(name)
    source = create_source_model(name, pretrained, checkpoint_path, img_size, num_classes, **kwargs)
    families = {Cait: CaitSupernet, T2TViT: T2TViTSupernet, SReT: SReTSupernet}
    family = families.get(type(source), VisionTransformerSupernet)
    return family(source, name, model_kwargs=kwargs, gates=gates or GateConfig())


def create_source_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The timm model a supernet is converted from, with its weights loaded."""
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True or checkpoint_path, not both")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (AssertionError, TypeError) as e:  # timm asserts on bad sizes and rejects unknown kwargs
        raise ValueError(f"cannot build '{name}' with {kwargs}: {e}") from None
    check_image_size(model, name)
    if checkpoint_path is not None:
        load_timm_checkpoint(model, checkpoint_path, reset_head=num_classes is not None)
    return model


def check_image_size(model: nn.Module, name: str) -> None:
    """Raise a `ValueError` if the model's patch embedding cannot cut its image size into whole patches (timm
    would only fail at the first forward, with an assertion)."""
    embed = getattr(model, "patch_embed", None)
    img_size, patch_size = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if img_size is None or patch_size is None or getattr(embed, "dynamic_img_pad", False):
        return
    for side, patch in zip(img_size, patch_size, strict=True):
        if side % patch:
            fits = [n for n in (side - side % patch, side - side % patch + patch) if n > 0]
            raise ValueError(
                f"image size {side} does not fit '{name}': it must be a multiple of the patch size {patch} "
                f"(e.g. {' or '.join(map(str, fits))})"
            )


def load_timm_checkpoint(model: nn.Module, path: str | os.PathLike, reset_head: bool = False) -> None:
    """Load a timm-format state dict into `model`, resampling position embeddings to its image size.

    With `reset_head`, a classifier trained for another number of classes is dropped (the model keeps
    its freshly initialised head) instead of being an error.
    """
    filter_fn = {Cait: cait_checkpoint_filter, SReT: sret_checkpoint_filter}.get(type(model), checkpoint_filter_fn)
    state = filter_fn(load_state_dict_file(path), model)
    expected = model.state_dict()
    head_keys = {k for k in expected if k.startswith("head.")}
    reinit = set()
    if reset_head and _only_class_count_differs(state.get("head.weight"), expected.get("head.weight")):
        warnings.warn(f"{path}: classifier head has another number of classes; it is re-initialised", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in head_keys}
        reinit = head_keys
    missing = sorted(set(expected) - set(state) - reinit)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)


def _only_class_count_differs(saved: torch.Tensor | None, wanted: torch.Tensor | None) -> bool:
    return (
        saved is not None
        and wanted is not None
        and saved.shape[0] != wanted.shape[0]
        and saved.shape[1:] == wanted.shape[1:]
    )

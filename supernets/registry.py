"""`build_supernet` and `list_supernets`: from a model name (and weights) to a searchable supernet."""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from .checkpoints import load_state_dict_file
from .family import Family, family_of_model, registered_families
from .layers.gates import GateConfig

if TYPE_CHECKING:
    from .base import Supernet


def _unsupported(model: nn.Module) -> list[str]:
    """Why `model` cannot become a supernet, as its family says (the ViT family's for a model of no family)."""
    return family_of_model(model).unsupported(model)


@functools.cache
def list_supernets() -> list[str]:
    """Every model name `build_supernet` accepts."""
    return sorted({name for family, name in _family_names() if _builds_supernet(family, name)})


def check_model_name(name: str) -> None:
    """Raise a `ValueError` that suggests close matches, or says why, if `name` cannot be a supernet."""
    if name in timm.list_models():
        with torch.device("meta"):  # the structure, without allocating weights
            reasons = _unsupported(timm.create_model(name))
        if reasons:
            raise ValueError(f"timm model '{name}' cannot be searched: {'; '.join(reasons)}")
        return
    # Only the names close to `name` are built to check them: building all of them takes seconds per typo.
    candidates = _family_names()
    close = difflib.get_close_matches(name, sorted({n for _, n in candidates}), n=10, cutoff=0.6)
    close = [n for n in close if any(_builds_supernet(f, n) for f, candidate in candidates if candidate == n)][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model '{name}'{hint} (list_supernets() lists them all)")


def _family_names() -> list[tuple[Family, str]]:
    return [(family, name) for family in registered_families() for name in family.model_names()]


def _builds_supernet(family: Family, name: str) -> bool:
    try:
        with torch.device("meta"):  # the structure, without allocating weights
            model = timm.create_model(name, **family.structure_kwargs(name))
    except Exception:  # an entry point that cannot build this way is not one of the family's models
        return False
    return family.accepts(model) and not family.unsupported(model)


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
    supernet_class = family_of_model(source).supernet_class
    return supernet_class(source, name, model_kwargs=kwargs, gates=gates or GateConfig())


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
    state = family_of_model(model).checkpoint_filter(load_state_dict_file(path), model)
    expected = model.state_dict()
    classifier = model.get_classifier()
    head = next(f"{name}." for name, module in model.named_modules() if module is classifier)  # e.g. head.fc.
    head_keys = {k for k in expected if k.startswith(head)}
    reinit = set()
    weight = f"{head}weight"
    if reset_head and _only_class_count_differs(state.get(weight), expected.get(weight)):
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

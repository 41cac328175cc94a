"""What the timm entry points of the families we define ourselves (timm has no such models) share: no weights
to download."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from timm.models import register_model
from torch import nn

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


def register_variants(module: str, names: Iterable[str], create: Callable[..., nn.Module]) -> None:
    """Register a timm entry point for each named variant of a model defined in `module`, each one only calling
    `create(name, pretrained, **kwargs)`: timm's registry of variants that only set arguments."""
    for name in names:

        def entry(pretrained: bool = False, _name: str = name, **kwargs: Any) -> nn.Module:
            return create(_name, pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = module  # timm lists the model under the module's last name
        register_model(entry)


class LinearClassifier:
    """timm's classifier interface for a model whose head is one linear layer on `num_features` pooled features,
    pooled only its own way (`global_pool`)."""

    global_pool: ClassVar[str]  # the only pooling the model has, as timm names it
    num_features: int
    num_classes: int
    head: nn.Module

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, self.global_pool):
            raise ValueError(
                f"{type(self).__name__} pools by {self.global_pool!r}; global_pool {global_pool!r} is not supported"
            )
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

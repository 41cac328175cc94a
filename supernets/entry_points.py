"""What the timm entry points of the families we define ourselves (timm has no such models) share: no weights
to download."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import nn

# Passed by timm.create_model to every entry point; meaningless for a model without released weights here.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_variants(
    module: str, model_class: type[nn.Module], variants: Mapping[str, Mapping[str, Any]], weights_note: str = ""
) -> None:
    """Register a timm entry point for each named variant of `model_class` (defined in `module`), each one only
    setting its constructor arguments: timm's registry of variants. `pretrained=True` is a `ValueError` (with
    `weights_note` appended), as we download no weights."""
    for name, args in variants.items():

        def entry(pretrained: bool = False, _name: str = name, _args: Mapping = args, **kwargs: Any) -> nn.Module:
            if pretrained:
                raise ValueError(
                    f"{_name}: pretrained weights are not downloaded by spvit-search; build with pretrained=False "
                    f"and load a checkpoint (checkpoint_path=... or load_state_dict){weights_note}"
                )
            return model_class(**{**_args, **{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY_KWARGS}})

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = module  # timm lists the model under the module's last name
        register_model(entry)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last, as timm's models do; plain
    Python rather than torch.linspace, so that a model also builds on the meta device."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def init_linear_weights(module: nn.Module) -> None:
    """timm's ViT initialisation of a linear layer (truncated normal, std 0.02, zero bias); for `Module.apply`."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def linear_head(num_features: int, num_classes: int) -> nn.Module:
    """A linear classifier, or no head at all (timm's `num_classes=0`: the pooled features)."""
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


class LinearClassifier:
    """timm's classifier interface for a model whose head is one linear layer on `num_features` pooled features,
    pooled only its own way (`global_pool`); its forward is `forward_head(forward_features(x))`."""

    global_pool: ClassVar[str]  # the only pooling the model has, as timm names it
    num_features: int
    num_classes: int
    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, self.global_pool):
            raise ValueError(
                f"{type(self).__name__} pools by {self.global_pool!r}; global_pool {global_pool!r} is not supported"
            )
        self.num_classes = num_classes
        self.head = linear_head(self.num_features, num_classes)

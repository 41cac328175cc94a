"""The optimizer of every training run, and its parameter groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def adamw(
    params: Iterable[nn.Parameter] | list[dict[str, object]], lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU, CUDA and MPS): one kernel for all parameters, and no host read of the step
    counts, which the default per-tensor loop reads with `.item()` for every parameter at every step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()
) -> list[dict[str, object]]:
    """AdamW groups as timm and DeiT use them: no decay on biases, norms and other 1-D parameters, nor on
    the names `model.no_weight_decay()` lists (tokens, position embeddings). `exclude` is left out
    (e.g. gate logits, which have an optimizer of their own)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in excluded:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]

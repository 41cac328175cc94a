"""Slimmable layers: a norm and a linear layer that also run on the first D' < D channels of their input, for a
family that searches its embedding width."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SlimmableLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels its input has: slimmed tokens (the first D' < D channels) are normalised
    with the first D' weights and biases."""

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm) -> SlimmableLayerNorm:
        slim = cls(norm.normalized_shape, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        slim.load_state_dict(norm.state_dict())
        return slim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., D')
        dim = int(x.shape[-1])  # int: under tracing (fvcore) a size is a tensor
        if dim == self.normalized_shape[0]:
            return super().forward(x)
        return F.layer_norm(x, (dim,), self.weight[:dim], self.bias[:dim], self.eps)


class SlimmableLinear(nn.Linear):
    """A linear layer that also runs slimmed: on the first input columns its input has, and to its first
    `out_width` outputs (all while None)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_width: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SlimmableLinear:
        w = linear.weight
        slim = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        slim.load_state_dict(linear.state_dict())
        return slim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in') -> (..., out')
        rows, columns = self.out_width or self.out_features, int(x.shape[-1])
        if (rows, columns) == (self.out_features, self.in_features):
            return super().forward(x)
        return F.linear(x, self.weight[:rows, :columns], None if self.bias is None else self.bias[:rows])

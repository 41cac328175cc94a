"""`SuperBlock`: timm's pre-norm transformer block with a unified MSA and a gated MLP, the block of every family
whose blocks are timm's `Block` or close to it."""

from __future__ import annotations

import copy
from typing import Self

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..architecture import BlockChoice
from ..checkpoints import prefixed
from .affine_skip import folded_norm_state
from .gates import GateConfig
from .unified_attention import UnifiedAttention
from .unified_mlp import UnifiedMlp


class SuperBlock(nn.Module):
    """timm's pre-norm `Block` with a unified MSA and a gated MLP."""

    def __init__(
        self,
        norm1: nn.Module,
        attn: UnifiedAttention,
        ls1: nn.Module,
        drop_path1: nn.Module,
        norm2: nn.Module,
        mlp: UnifiedMlp,
        ls2: nn.Module,
        drop_path2: nn.Module,
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    @classmethod
    def from_timm(cls, block: Block, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig) -> Self:
        """A copy of timm's `block` with its attention and MLP unified."""
        return cls(
            copy.deepcopy(block.norm1),
            UnifiedAttention.from_timm(block.attn, grid_size, num_prefix_tokens, gates),
            copy.deepcopy(block.ls1),
            copy.deepcopy(block.drop_path1),
            copy.deepcopy(block.norm2),
            UnifiedMlp.from_timm(block.mlp, gates),
            copy.deepcopy(block.ls2),
            copy.deepcopy(block.drop_path2),
        )

    def mixer_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn.has_branch(self.attn.chosen_mixer()):  # an identity skip costs nothing, its norm included
            x = x + self.drop_path1(self.mixer_branch(x))
        return x + self.drop_path2(self.mlp_branch(x))

    def mixer_parameters(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        """The parameters a subnet needs for `mixer` in this block's mixer branch, for tokens of width `dim`
        (default: the full width; slimmed tokens use slices, e.g. the norm's first `dim` channels). An affine skip
        keeps one norm, into which its s, t and the layer scale fold; an identity skip nothing."""
        if mixer == "skip":
            return [] if self.attn.skip_affine is None else [p[:dim] for p in self.norm1.parameters()]
        per_channel = [p[:dim] for p in (*self.norm1.parameters(), *self.ls1.parameters())]
        return [*per_channel, *self.attn.parameters_for(mixer, dim)]

    def mlp_parameter_counts(self, dim: int | None = None) -> tuple[int, int]:
        """(parameters of the MLP branch that every number of kept units needs, parameters per kept hidden unit),
        for tokens of width `dim` (default: the full width)."""
        mlp = self.mlp
        dim = dim or mlp.fc1.in_features
        per_channel = [*self.norm2.parameters(), *self.ls2.parameters()]  # and fc2's bias
        fixed_count = sum(p[:dim].numel() for p in per_channel) + (0 if mlp.fc2.bias is None else dim)
        per_unit = dim + (mlp.fc1.bias is not None) + dim  # a row of fc1, its bias, a column of fc2
        return fixed_count, per_unit

    def subnet_state(self, choice: BlockChoice, dim: int | None = None) -> dict[str, torch.Tensor]:
        """The state dict of the `SubnetBlock` for `choice`, for tokens of width `dim` (default: the full width;
        slimmed, the norms' and layer scales' first `dim` channels). An identity skip block has no mixer branch; an
        affine skip block only its folded norm."""

        def per_channel(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
            return {prefix + k: v[:dim] for k, v in module.state_dict().items()}

        state = {}
        if choice.mixer == "skip" and self.attn.skip_affine is not None:
            scale = self.ls1(torch.ones_like(self.norm1.weight))  # the per-channel layer scale (ones without one)
            state |= prefixed("norm1.", folded_norm_state(self.norm1, self.attn.skip_affine, scale, dim))
        elif choice.mixer != "skip":
            state |= per_channel("norm1.", self.norm1) | per_channel("ls1.", self.ls1)
            state |= prefixed("mixer.", self.attn.plain_state(choice.mixer, dim))
        state |= per_channel("norm2.", self.norm2) | per_channel("ls2.", self.ls2)
        return state | prefixed("mlp.", self.mlp.pruned_state(choice.mlp_kept, dim))

"""`SReTSubnet`, an SReT exported for one `Architecture`: SReT's stem, NLLs, downsampling convs and head around
its distinct blocks, each holding its chosen mixer and pruned MLP, run at the architecture's group splits.

A block's msa is SReT's own `SlicedAttention` (with the block's permutation seed, so eval mode permutes as the
supernet does), a bconv is a plain `BottleneckConv` over the stage's grid, and a skipped mixer leaves only the
residual's scale: x ← a·x. It lives apart from `sret_supernet` because it builds on `subnet` and the registry,
which imports `sret_supernet`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...architecture import Architecture, BlockChoice
from ...base import Subnet, imagenet_data_config
from ...layers.plain import PrunedMlp, plain_mixer
from ...registry import create_source_model
from .sret import SlicedAttention, SReTBlock, sret_variants
from .supernet import SReTStemAndHead, group_choices


class ResidualScale(nn.Module):
    """The learnable residual of a block whose mixer is skipped: x ← a·x (the branch and its scale b are gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x


class SReTSubnetBlock(nn.Module):
    """SReT's block for one `BlockChoice`: sliced attention (msa), a bottleneck conv over the stage's grid (bconv1,
    bconv3), no mixer branch at all (identity skip) or its folded norm alone (affine skip), and a pruned MLP. Takes
    over `block`'s attention, norms, residual scalars and drop path (pass a model built for the purpose)."""

    def __init__(
        self, block: SReTBlock, choice: BlockChoice, grid_size: tuple[int, int], fold_bn: bool, skip_mixer: str
    ) -> None:
        super().__init__()
        self.mixer = plain_mixer(choice, block.attn, grid_size, 0, fold_bn, lambda: block.attn, skip_mixer)
        if self.mixer is None:
            self.residual1: nn.Module = ResidualScale()
        else:
            self.norm1, self.residual1 = block.norm1, block.residual1
        self.norm2, self.residual2, self.drop_path = block.norm2, block.residual2, block.drop_path
        self.mlp = PrunedMlp.from_timm(block.mlp, len(choice.mlp_kept))

    def mixer_branch(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:
        """The mixer's output on the normed tokens x (B, N, D), before the residual's scale b: zero for an identity
        skip. Only attention slices the tokens; a conv sees the whole grid whatever the groups."""
        if self.mixer is None:
            return torch.zeros_like(x)
        h = self.norm1(x)
        return self.mixer(h, groups, permute) if isinstance(self.mixer, SlicedAttention) else self.mixer(h)

    def forward(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:  # x: (B, N, D)
        if self.mixer is None:
            x = self.residual1(x)
        else:
            x = self.residual1(x, self.drop_path(self.mixer_branch(x, groups, permute)))
        return self.residual2(x, self.drop_path(self.mlp_branch(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output on the normed tokens x (B, N, D), before the residual's scale b."""
        return self.mlp(self.norm2(x))


class SReTSubnet(SReTStemAndHead, Subnet):
    """The exported SReT: the stem, NLLs and head of the SReT `arch.model` (created for its structure, with the
    supernet's model kwargs) around the blocks of one `Architecture`, at its group splits `arch.groups`. Built on
    the ambient device: under `torch.device("meta")` it allocates nothing that a state dict replaces anyway."""

    family = "sret"

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        super().__init__()
        if arch.model not in sret_variants():
            raise ValueError(f"model: '{arch.model}' is not an SReT; expected one of {', '.join(sret_variants())}")
        kwargs = dict(model_kwargs or {})
        sret = create_source_model(arch.model, img_size=arch.img_size, num_classes=arch.num_classes, **kwargs)
        source_blocks = [(stage, block) for stage in sret.stages for block in stage.blocks]
        arch.validate_for(
            model=arch.model,
            img_size=arch.img_size,
            num_classes=arch.num_classes,
            mlp_hidden=[block.mlp.fc1.out_features for _, block in source_blocks],
            choices=group_choices(sret.stages),
        )
        self.adopt_stem_and_head(sret, arch.model)
        self.groups = arch.groups
        self.blocks = nn.ModuleList(
            SReTSubnetBlock(block, choice, stage.grid_size, fold_bn, arch.skip_mixer)
            for (stage, block), choice in zip(source_blocks, arch.blocks, strict=True)
        )
        self.record_source(arch, kwargs, fold_bn, imagenet_data_config(self.in_chans, arch, crop_pct=0.875))

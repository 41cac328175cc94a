"""`SwinSubnet`, a Swin exported for one `Architecture`: timm's stem, patch merging, norm and head around plain
blocks. An msa block keeps timm's (shifted) window attention; a bconv block is a real `Conv2d` over the stage's
whole map, as the search computed it; a skip block has no mixer branch."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import nn

from ...architecture import Architecture, BlockChoice
from ...base import Subnet
from ...layers.plain import PrunedMlp, SubnetBlock, plain_mixer
from .supernet import SwinStemAndHead, from_windows, shift_mask, to_windows


class ShiftedWindowAttention(WindowAttention):
    """timm's window attention on a block's raster tokens: (B, H·W, C) -> cyclic shift, windows, attention with the
    relative position bias and the shift mask, and back."""

    def __init__(self, block: SwinTransformerBlock) -> None:
        attn = block.attn
        super().__init__(
            attn.dim,
            attn.num_heads,
            head_dim=attn.proj.in_features // attn.num_heads,
            window_size=attn.window_size,
            qkv_bias=attn.qkv.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
        )
        self.grid_size = tuple(block.input_resolution)
        self.shift_size = tuple(block.shift_size)
        self.register_buffer("attn_mask", self._shift_mask(), persistent=False)

    def _shift_mask(self) -> torch.Tensor | None:
        return shift_mask(self.grid_size, self.window_size, self.shift_size, self.relative_position_index.device)

    def init_non_persistent_buffers(self) -> None:
        super().init_non_persistent_buffers()
        self.attn_mask = self._shift_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H·W, C)
        windows = to_windows(x, self.grid_size, self.window_size, self.shift_size)  # (B·nW, n, C)
        return from_windows(super().forward(windows, mask=self.attn_mask), self.grid_size, self.window_size,
                            self.shift_size)  # fmt: skip


class SwinSubnet(SwinStemAndHead, Subnet):
    """The exported subnet: timm's Swin outside the blocks, and each block rebuilt for its choice.

    The timm model `arch.model` is created (`Subnet.create_source`) for its structure; `fold_bn` builds the
    inference form of the bconv layers (no BN, a conv bias).
    """

    family = "swin"

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        super().__init__()
        swin = self.create_source(arch, model_kwargs, fold_bn)
        self.adopt_stem_and_head(swin, arch.model)
        blocks = zip(self.source_blocks(swin), arch.blocks, strict=True)
        self.blocks = nn.Sequential(*[self._block(block, choice, fold_bn, arch.skip_mixer) for block, choice in blocks])

    @staticmethod
    def source_blocks(source: nn.Module) -> list[nn.Module]:
        return [b for stage in source.layers for b in stage.blocks]

    @staticmethod
    def _block(block: SwinTransformerBlock, choice: BlockChoice, fold_bn: bool, skip_mixer: str) -> SubnetBlock:
        grid = tuple(block.input_resolution)
        mixer = plain_mixer(choice, block.attn, grid, 0, fold_bn, lambda: ShiftedWindowAttention(block), skip_mixer)
        mlp = PrunedMlp.from_timm(block.mlp, len(choice.mlp_kept))
        parts = (block.norm1, nn.Identity(), block.drop_path1, block.norm2, nn.Identity(), block.drop_path2)
        return SubnetBlock(mixer, *parts, mlp)

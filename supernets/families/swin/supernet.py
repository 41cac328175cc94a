"""The Swin supernet: timm's `SwinTransformer` with a unified window attention and a gated MLP in every block.

Two things set Swin apart from ViT here:

- Its msa candidate is (shifted) window attention: a cyclic shift, attention within ws×ws windows with a learnt
  relative position bias (and, on shifted blocks, the mask that keeps the wrapped-around regions apart), and the
  shift back. It is computed from the same split qk and v as every family's.
- Its bconv candidates run on the stage's whole H×W map: not windowed, not shifted, zero-padded at the image
  border, during the search and in the exported subnet alike. SPViT searched Swin with a windowed conv and then
  fine-tuned a full-map one; here the search judges the operator that is deployed.

The blocks see their stage's tokens in raster order, (B, H·W, C), so the shared unified layers apply unchanged;
the patch merging between stages, the stem, the final norm and the head stay dense, priced as fixed parts.
A timm model is converted by copying its weights; the dense architecture computes exactly what timm computes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import nn

from ...base import Supernet, adopt_patch_grid, check_input_size, patch_model_reasons, plain_mlp_reason
from ...layers.gates import GateConfig
from ...layers.super_block import SuperBlock
from ...layers.unified_attention import AttentionWeights, UnifiedAttention
from ...layers.unified_mlp import UnifiedMlp


def unsupported_swin_features(model: nn.Module) -> list[str]:
    """Why a timm model cannot become a Swin supernet; empty when it can."""
    reasons = patch_model_reasons(model, SwinTransformer, "not timm's SwinTransformer")
    if type(model) is not SwinTransformer:
        return reasons
    if model.dynamic_img_size:
        reasons.append("dynamic image size (the conv candidates need one fixed grid)")
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            where = f"stage {s} block {b}"
            if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
                reasons.append(f"{where} is a {type(block).__name__} (needs timm's SwinTransformerBlock)")
                return reasons
            grid, window = block.input_resolution, block.window_size
            if any(g % w for g, w in zip(grid, window, strict=True)):
                reasons.append(f"{where}: window {window} does not divide the {grid[0]}x{grid[1]} grid")
                return reasons
            if mlp_reason := plain_mlp_reason(b, block.mlp):
                reasons.append(f"stage {s} {mlp_reason}")
                return reasons
    return reasons


def _bands(size: int, window: int, shift: int, device: torch.device | None) -> torch.Tensor:
    """Per position along one axis of a shifted map, which of its three regions it came from: the unshifted
    map's first size-window positions, the next window-shift, or the last shift (wrapped around)."""
    position = torch.arange(size, device=device)
    return (position >= size - window).long() + (position >= size - shift).long()


def shift_mask(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor | None:
    """The attention mask of shifted windows, (nW, n, n) of 0 or -100: within a window, tokens that the cyclic shift
    brought together from different regions of the map do not attend to each other. None without a shift."""
    if not any(shift):
        return None
    regions = _bands(grid[0], window[0], shift[0], device)[:, None] * 3 + _bands(grid[1], window[1], shift[1], device)
    windows = window_partition(regions.view(1, *grid, 1), window).view(-1, window[0] * window[1])  # (nW, n)
    apart = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(apart.shape, device=device).masked_fill(apart, -100.0)


def to_windows(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(B, H·W, C) raster tokens -> (B·nW, wh·ww, C): cyclically shifted by -`shift`, cut into windows."""
    B, _, C = x.shape
    x = x.view(B, *grid, C)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(x, window).view(-1, window[0] * window[1], C)


def from_windows(
    x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """The inverse of `to_windows`: (B·nW, wh·ww, C) -> (B, H·W, C)."""
    C = x.shape[-1]
    x = window_reverse(x.view(-1, *window, C), window, *grid)  # (B, H, W, C)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x.reshape(x.shape[0], grid[0] * grid[1], C)


class UnifiedWindowAttention(UnifiedAttention):
    """A unified MSA whose msa candidate is timm's (shifted) window attention; the conv candidates and the skip
    are the shared ones, on the whole token grid."""

    @classmethod
    def from_swin(cls, block: SwinTransformerBlock, gates: GateConfig) -> UnifiedWindowAttention:
        """Convert the window attention of timm's Swin `block`, with its windows, shift and position bias."""
        unified = cls.converted(block.attn, tuple(block.input_resolution), 0, gates)
        unified.window_size = tuple(block.attn.window_size)
        unified.shift_size = tuple(block.shift_size)
        unified.relative_position_bias_table = copy.deepcopy(block.attn.relative_position_bias_table)
        device = unified.relative_position_bias_table.device
        unified.register_buffer(
            "relative_position_index",
            get_relative_position_index(*unified.window_size, device=device),
            persistent=False,
        )
        unified.register_buffer("attn_mask", shift_mask(unified.grid_size, unified.window_size, unified.shift_size,
                                                        device), persistent=False)  # fmt: skip
        return unified

    def position_bias(self, heads: int) -> torch.Tensor:
        """The relative position bias of the first `heads` heads: (heads, n, n) for n = wh·ww tokens a window."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)[:heads]

    def _attention(self, x: torch.Tensor, v: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
        heads, dh = weights.heads, self.head_dim
        qkv = torch.cat([F.linear(x, *weights.qk), v], dim=-1)  # (B, N, 3·A): q, k, v as timm's fused qkv
        windows = to_windows(qkv, self.grid_size, self.window_size, self.shift_size)  # (B·nW, n, 3·A)
        Bw, n, _ = windows.shape
        q, k, v = windows.reshape(Bw, n, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B·nW, H, n, dh)
        bias = self.position_bias(heads).unsqueeze(0)  # (1, H, n, n)
        if self.attn_mask is not None:  # (nW, n, n), 0 or -100: one per window position, repeated over the batch
            nw = self.attn_mask.shape[0]
            bias = (bias.view(1, 1, heads, n, n) + self.attn_mask.view(1, nw, 1, n, n)).expand(Bw // nw, -1, -1, -1, -1)
            bias = bias.reshape(Bw, heads, n, n)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)
        out = from_windows(out.transpose(1, 2).reshape(Bw, n, heads * dh), self.grid_size, self.window_size,
                           self.shift_size)  # fmt: skip
        return self.proj_drop(F.linear(out, *weights.proj))  # (B, N, D)

    def parameters_for(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        params = super().parameters_for(mixer, dim)
        return [*params, self.relative_position_bias_table] if mixer == "msa" else params

    def plain_state(self, mixer: str, dim: int | None = None) -> dict[str, torch.Tensor]:
        state = super().plain_state(mixer, dim)
        if mixer == "msa":
            state["relative_position_bias_table"] = self.relative_position_bias_table
        return state


def swin_super_block(block: SwinTransformerBlock, gates: GateConfig) -> SuperBlock:
    """A copy of timm's Swin `block` with its window attention and MLP unified (it has no layer scales)."""
    return SuperBlock(
        copy.deepcopy(block.norm1),
        UnifiedWindowAttention.from_swin(block, gates),
        nn.Identity(),
        copy.deepcopy(block.drop_path1),
        copy.deepcopy(block.norm2),
        UnifiedMlp.from_timm(block.mlp, gates),
        nn.Identity(),
        copy.deepcopy(block.drop_path2),
    )


class SwinStemAndHead(nn.Module):
    """timm's `SwinTransformer` around `self.blocks` (every stage's blocks in order): the patch embedding, the
    patch merging that starts each later stage, the final norm and the head, copied from a timm model. The supernet
    and its subnets share this code, so that both compute exactly what timm computes outside the blocks."""

    blocks: nn.Sequential

    def adopt_stem_and_head(self, swin: SwinTransformer, name: str) -> None:
        """Copy every module of `swin` outside its blocks, and the stage layout their forward needs."""
        adopt_patch_grid(self, swin, name, unsupported_swin_features(swin))
        self.patch_embed = copy.deepcopy(swin.patch_embed)
        self.downsamples = nn.ModuleList(copy.deepcopy(stage.downsample) for stage in swin.layers)
        self.stage_depths = [len(stage.blocks) for stage in swin.layers]
        self.norm = copy.deepcopy(swin.norm)
        self.head = copy.deepcopy(swin.head)
        self.num_features = swin.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        check_input_size(x, self.name, self.img_size)
        x = self.patch_embed(x)  # (B, gh, gw, C)
        start = 0
        for downsample, depth in zip(self.downsamples, self.stage_depths, strict=True):
            x = downsample(x)  # (B, h, w, C'): halved and widened after the first stage
            B, h, w, C = x.shape
            x = x.reshape(B, h * w, C)  # the blocks see raster tokens
            for block in self.blocks[start : start + depth]:
                x = block(x)
            x = x.view(B, h, w, C)
            start += depth
        return self.norm(x)  # (B, h, w, C_last)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """As timm's Swin: no decay on the relative position bias tables."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


class SwinSupernet(SwinStemAndHead, Supernet):
    def adopt(self, swin: SwinTransformer, name: str, gates: GateConfig) -> None:
        self.adopt_stem_and_head(swin, name)
        self.blocks = nn.Sequential(*[swin_super_block(b, gates) for stage in swin.layers for b in stage.blocks])

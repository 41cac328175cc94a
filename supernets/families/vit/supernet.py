"""The DeiT/ViT supernet: timm's `VisionTransformer` with unified MSA and gated MLPs in every block.

A timm model is converted by copying its weights; every module outside the blocks (patch embedding,
tokens, norms, head) is kept as it is, so the dense architecture computes exactly what timm computes.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc
from torch import nn

from ...base import Supernet, adopt_patch_grid, check_input_size, patch_model_reasons, plain_mlp_reason
from ...layers.gates import GateConfig
from ...layers.super_block import SuperBlock


def unsupported_features(model: nn.Module) -> list[str]:
    """Why a timm model cannot become a ViT supernet; empty when it can."""
    reasons = patch_model_reasons(model, VisionTransformer, "only timm's VisionTransformer is supported")
    if type(model) is not VisionTransformer:
        return reasons
    if model.attn_pool is not None:
        reasons.append("attention pooling (global_pool='map')")
    if not isinstance(model.patch_drop, nn.Identity):
        reasons.append("patch dropout (it breaks the token grid)")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            reasons.append(f"block {i} is a {type(block).__name__}, not timm's standard Block")
            break
        if type(block.attn) is not Attention or block.attn.gate is not None:
            reasons.append(f"block {i} attention {type(block.attn).__name__} (needs plain Attention)")
            break
        if not isinstance(block.attn.norm, nn.Identity):
            reasons.append("attention scale norm (scale_attn_norm)")
            break
        if mlp_reason := plain_mlp_reason(i, block.mlp):
            reasons.append(mlp_reason)
            break
    return reasons


class ViTStemAndHead(nn.Module):
    """timm's `VisionTransformer` around `self.blocks`: patch embedding, prefix tokens, position embeddings,
    final norm and head, copied from a timm model. The supernet and the subnets exported from it share this
    code, so that both compute exactly what timm computes outside the blocks."""

    blocks: nn.Sequential

    def adopt_stem_and_head(self, vit: VisionTransformer, name: str) -> None:
        """Copy every module and token of `vit` outside its blocks, and the settings their forward needs."""
        adopt_patch_grid(self, vit, name, unsupported_features(vit))
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.no_embed_class = vit.no_embed_class
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)
        for module in ("patch_embed", "pos_drop", "norm_pre", "norm", "fc_norm", "head_drop", "head"):
            setattr(self, module, copy.deepcopy(getattr(vit, module)))
        for param in ("cls_token", "reg_token", "pos_embed"):
            setattr(self, param, copy.deepcopy(getattr(vit, param)))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, gh·gw, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            return torch.cat([*prefix, x], dim=1)
        if self.no_embed_class:  # position embeddings cover the patch tokens only
            return self.pos_drop(torch.cat([*prefix, x + self.pos_embed], dim=1))
        return self.pos_drop(torch.cat([*prefix, x], dim=1) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        check_input_size(x, self.name, self.img_size)
        x = self.patch_embed(x).flatten(1, -2)  # (B, gh·gw, D); dynamic-size models return (B, gh, gw, D)
        x = self.norm_pre(self._pos_embed(x))  # (B, N, D)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = global_pool_nlc(x, self.global_pool, self.num_prefix_tokens, self.pool_include_prefix)
        return self.head(self.head_drop(self.fc_norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class VisionTransformerSupernet(ViTStemAndHead, Supernet):
    def adopt(self, vit: VisionTransformer, name: str, gates: GateConfig) -> None:
        self.adopt_stem_and_head(vit, name)
        self.blocks = nn.Sequential(
            *[SuperBlock.from_timm(b, self.grid_size, self.num_prefix_tokens, gates) for b in vit.blocks]
        )

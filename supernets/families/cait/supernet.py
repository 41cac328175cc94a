"""The CaiT supernet: timm's `Cait` ("Going deeper with Image Transformers", Touvron et al., ICCV 2021) with
unified MSA and gated MLPs in its self-attention blocks.

Three things set CaiT apart from ViT here:

- Its self-attention (SA) blocks see the patch tokens only. The class token enters in the class-attention
  (CA) blocks at the end (`blocks_token_only`), which read every token but update the class token alone.
  So every SA token lies on the conv grid (no prefix tokens), and the CA blocks, whose cost no choice
  changes, stay as timm built them.
- Talking-heads attention: the attention logits are mixed across heads by a linear layer (proj_l) before
  the softmax and the weights by another (proj_w) after it. Only the msa candidate has them; the conv
  candidates reuse v and proj, as ViT's do.
- LayerScale: each SA branch ends in a learnable per-channel scale γ (`gamma_1`, `gamma_2`). It stays a layer
  (ls1, ls2) during search; export folds it into the linear layer that ends the branch (`cait_subnet`).

A timm model is converted by copying its weights; the dense architecture computes exactly what timm computes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, resample_abs_pos_embed
from timm.models.cait import Cait, LayerScaleBlock, TalkingHeadAttn
from timm.models.cait import checkpoint_filter_fn as timm_cait_filter
from torch import nn

from ...architecture import BlockChoice
from ...base import Supernet, adopt_patch_grid, check_input_size, patch_model_reasons, plain_mlp_reason
from ...layers.gates import GateConfig
from ...layers.super_block import SuperBlock
from ...layers.unified_attention import UnifiedAttention
from ...layers.unified_mlp import UnifiedMlp


def unsupported_cait_features(model: nn.Module) -> list[str]:
    """Why a timm model cannot become a CaiT supernet; empty when it can."""
    reasons = patch_model_reasons(model, Cait, "not timm's Cait")
    if type(model) is not Cait:
        return reasons
    if model.blocks_token_only is None or model.cls_token is None:
        reasons.append("no class-attention blocks (a model pruned for features)")
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not LayerScaleBlock or type(attn) is not TalkingHeadAttn:
            kind = f"{type(block).__name__} with {type(attn).__name__}"
            reasons.append(f"block {i} is a {kind} (needs timm's LayerScaleBlock with TalkingHeadAttn)")
            break
        if mlp_reason := plain_mlp_reason(i, block.mlp):
            reasons.append(mlp_reason)
            break
    return reasons


def cait_checkpoint_filter(state: dict[str, torch.Tensor], model: Cait) -> dict[str, torch.Tensor]:
    """timm's CaiT checkpoint filter (it unwraps `model` and drops DDP's `module.`), with the position embeddings
    resampled to the model's grid. CaiT's cover the patch tokens only; timm's ViT filter would assume a class
    token among them."""
    state = timm_cait_filter(state, model)
    pos = state.get("pos_embed")  # (1, N, D)
    if pos is not None and pos.shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=0)
    return state


def talking_heads_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: nn.Linear, proj_w: nn.Linear, drop: float, training: bool
) -> torch.Tensor:
    """Talking-heads attention as timm's `TalkingHeadAttn` computes it: (B, H, N, dh) from q, k, v (B, H, N, dh).

    The heads' logits q·kᵀ/√dh are mixed by proj_l (H → H) before the softmax and the weights by proj_w after it;
    the matmuls are explicit (not SDPA, which cannot mix heads), so FLOP counters see them as timm's do.
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    attn = proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # heads last for the linear: (B, N, N, H)
    attn = proj_w(attn.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, N, N)
    return F.dropout(attn, drop, training) @ v


class TalkingHeadsUnifiedAttention(UnifiedAttention):
    """Unified MSA whose msa candidate is talking-heads attention; the conv candidates are UnifiedAttention's."""

    def __init__(
        self, dim: int, num_heads: int, grid_size: tuple[int, int], num_prefix_tokens: int, **kwargs: Any
    ) -> None:
        super().__init__(dim, num_heads, grid_size, num_prefix_tokens, **kwargs)
        self.proj_l = nn.Linear(num_heads, num_heads)  # mixes the heads' attention logits
        self.proj_w = nn.Linear(num_heads, num_heads)  # mixes the heads' attention weights

    @classmethod
    def from_timm(
        cls, attn: TalkingHeadAttn, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig
    ) -> TalkingHeadsUnifiedAttention:
        """Convert timm's `TalkingHeadAttn` with its head-mixing layers."""
        unified = cls.converted(attn, grid_size, num_prefix_tokens, gates)
        unified.proj_l = copy.deepcopy(attn.proj_l)
        unified.proj_w = copy.deepcopy(attn.proj_w)
        return unified

    def parameters_for(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        params = super().parameters_for(mixer, dim)
        return [*params, *self.proj_l.parameters(), *self.proj_w.parameters()] if mixer == "msa" else params

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return talking_heads_attention(q, k, v, self.proj_l, self.proj_w, self.attn_drop, self.training)


def _layer_scale(gamma: nn.Parameter) -> LayerScale:
    """timm's `LayerScale` holding (a copy of) `gamma` (D,)."""
    scale = LayerScale(gamma.numel())
    scale.gamma = copy.deepcopy(gamma)
    return scale


class CaitSuperBlock(SuperBlock):
    """CaiT's `LayerScaleBlock` as a `SuperBlock`, whose forward, branches and parameter counts it shares: a
    talking-heads unified MSA, a gated MLP, and `gamma_1`, `gamma_2` as the layer scales ls1, ls2."""

    @classmethod
    def from_cait(cls, block: LayerScaleBlock, grid_size: tuple[int, int], gates: GateConfig) -> CaitSuperBlock:
        return cls(
            copy.deepcopy(block.norm1),
            TalkingHeadsUnifiedAttention.from_timm(block.attn, grid_size, num_prefix_tokens=0, gates=gates),
            _layer_scale(block.gamma_1),
            copy.deepcopy(block.drop_path),
            copy.deepcopy(block.norm2),
            UnifiedMlp.from_timm(block.mlp, gates),
            _layer_scale(block.gamma_2),
            copy.deepcopy(block.drop_path),
        )

    def subnet_state(self, choice: BlockChoice, dim: int | None = None) -> dict[str, torch.Tensor]:
        """Talking heads' proj_l and proj_w join msa, and the layer scales are folded away."""
        state = super().subnet_state(choice, dim)
        if choice.mixer == "msa":
            state |= self.attn.proj_l.state_dict(prefix="mixer.proj_l.")
            state |= self.attn.proj_w.state_dict(prefix="mixer.proj_w.")
        if choice.mixer != "skip":
            _fold_layer_scale(state, "ls1.gamma", "mixer.proj.")
        _fold_layer_scale(state, "ls2.gamma", "mlp.fc2.")
        return state


def _fold_layer_scale(state: dict[str, torch.Tensor], gamma: str, linear: str) -> None:
    """Fold the layer scale γ (D,) at key `gamma` into the linear layer before it: γ·(W·h + b) = (γ·W)·h + γ·b."""
    scale = state.pop(gamma)
    state[f"{linear}weight"] = state[f"{linear}weight"] * scale[:, None]  # (D, in): row d scaled by γ_d
    if f"{linear}bias" in state:
        state[f"{linear}bias"] = state[f"{linear}bias"] * scale


class CaitStemAndHead(nn.Module):
    """timm's `Cait` around `self.blocks` (the SA blocks): patch embedding, position embeddings, class token,
    class-attention blocks, final norm and head, copied from a timm model. The supernet and the subnets exported
    from it share this code, so that both compute exactly what timm computes outside the SA blocks."""

    blocks: nn.Sequential

    def adopt_stem_and_head(self, cait: Cait, name: str) -> None:
        """Copy every module and token of `cait` outside its SA blocks, and the settings their forward needs."""
        adopt_patch_grid(self, cait, name, unsupported_cait_features(cait))
        self.num_prefix_tokens = 0  # in the SA blocks; the class token joins in the CA blocks
        for module in ("patch_embed", "pos_drop", "blocks_token_only", "norm", "head_drop", "head"):
            setattr(self, module, copy.deepcopy(getattr(cait, module)))
        for param in ("cls_token", "pos_embed"):
            setattr(self, param, copy.deepcopy(getattr(cait, param)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        check_input_size(x, self.name, self.img_size)
        x = self.blocks(self.pos_drop(self.patch_embed(x) + self.pos_embed))  # (B, N, D): patch tokens only
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        for block in self.blocks_token_only:  # class attention: the class token reads every patch token
            cls_token = block(x, cls_token)
        return self.norm(torch.cat([cls_token, x], dim=1))  # (B, 1 + N, D)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1 + N, D)
        if self.global_pool:
            x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]  # (B, D)
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CaitSupernet(CaitStemAndHead, Supernet):
    def adopt(self, cait: Cait, name: str, gates: GateConfig) -> None:
        self.adopt_stem_and_head(cait, name)
        self.blocks = nn.Sequential(*[CaitSuperBlock.from_cait(b, self.grid_size, gates) for b in cait.blocks])

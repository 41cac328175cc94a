"""T2T-ViT, the Tokens-to-Token Vision Transformer (Yuan et al., ICCV 2021): dense models, timm-registered.

A ViT whose patch embedding is replaced by a Tokens-to-Token (T2T) module that builds the tokens
progressively, so that they carry local structure:

- a soft split (`nn.Unfold`, overlapping windows) turns the image into tokens: 7×7 windows with
  stride 4, then twice 3×3 windows with stride 2, giving (img/4)², (img/8)² and (img/16)² tokens;
- between two splits a small T2T layer re-mixes the tokens and narrows them to `token_dim` (64):
  `t2t_vit_*` use a single-head Performer layer (linear in the token count, because the first one
  sees 3136 tokens at 224), `t2t_vit_t_*` a single-head transformer layer (quadratic);
- a linear layer projects the last split's 576-wide tokens to the embedding width.

The backbone is a plain pre-norm ViT on (img/16)² tokens plus a class token, with a fixed sinusoid
position table, built from timm's `Block` so that the ViT supernet code can gate its attention and MLP.

Attention scale: the original scales the backbone's attention by head_dim^-0.5 when trained from
scratch, but its released checkpoints were trained with embed_dim^-0.5 (its entry points pass
`qk_scale = embed_dim ** -0.5` only when `pretrained`). timm's `Block` always uses head_dim^-0.5,
so those checkpoints need their q rows of every block's `attn.qkv.weight` multiplied by
num_heads^-0.5 before loading; the T2T layers' own scales are as in the original.

Counting convention: at 224, t2t_vit_7 has 4,310,222 parameters (frozen position table and random
features included) and 1.147 GMACs in the `core` convention (linear weights plus the attention
matmuls and the Performer's feature products); t2t_vit_14 21,545,550 / 4.783G; t2t_vit_t_14 21,541,070 / 6.089G.

Importing this module registers `t2t_vit_{7,10,12,14,19,24}` and `t2t_vit_t_{14,19,24}` with timm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ...entry_points import LinearClassifier, drop_path_rates, init_linear_weights, linear_head, register_variants

__all__ = [
    "PerformerTokenLayer",
    "T2TViT",
    "TokenAttention",
    "TokensToToken",
    "TransformerTokenLayer",
    "sinusoid_position_table",
    "t2t_vit_variants",
]


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """(1, num_positions, dim): channels 2i and 2i+1 hold sin and cos of position / 10000^(2i/dim)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (N, 1)
    channel = torch.arange(dim, dtype=torch.float64)
    angle = position / 10000 ** (2 * (channel // 2) / dim)  # (N, dim); a sin/cos pair shares its frequency
    table = torch.where(channel % 2 == 0, angle.sin(), angle.cos())
    return table.float()[None]  # computed in float64, like the original's numpy table, then stored as float32


def _split_size(size: int, split: nn.Unfold) -> int:
    """Windows per side of a `size`-wide image under a soft split (square kernel, stride and padding)."""
    return (size + 2 * split.padding - split.kernel_size) // split.stride + 1


class PerformerTokenLayer(nn.Module):
    """Single-head Performer T2T layer: (B, N, in_dim) -> (B, N, dim) at O(N) cost.

    Softmax attention exp(q·k) is approximated with positive random features
    φ(x) = exp(W·x − |x|²/2) / √m (Performer, Choromanski et al. 2021), so that the N×N attention
    matrix is never formed: out = φ(Q)·(φ(K)ᵀ·V) / (φ(Q)·Σₙ φ(Kₙ)).
    """

    # Keeps the normaliser positive when every feature underflows to zero.
    EPS = 1e-8

    def __init__(self, in_dim: int, dim: int = 64, feature_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(in_dim)
        # Named and ordered k, q, v as in the original, so that its weights keep their layout.
        self.kqv = nn.Linear(in_dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim, drop=(0.0, drop))  # dropout after the output only, as in the original
        num_features = int(dim * feature_ratio)
        # Orthogonal rows of norm √m, drawn once and never trained. A frozen Parameter rather than a
        # buffer, as in the original: saved in the state dict and part of the published parameter count.
        features = nn.init.orthogonal_(torch.empty(num_features, dim)) * math.sqrt(num_features)
        self.random_features = nn.Parameter(features, requires_grad=False)  # (m, dim)

    def positive_features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): (B, N, dim) -> (B, N, m); E[φ(q)·φ(k)] = exp(q·k) for Gaussian feature rows."""
        projected = x @ self.random_features.T  # (B, N, m)
        half_square_norm = x.square().sum(dim=-1, keepdim=True) / 2  # (B, N, 1)
        return torch.exp(projected - half_square_norm) / math.sqrt(self.random_features.shape[0])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.dim, dim=-1)  # each (B, N, dim)
        k_features, q_features = self.positive_features(k), self.positive_features(q)  # each (B, N, m)
        # Matmuls rather than the original's einsums: the same products, and fvcore counts them exactly.
        keys_values = k_features.transpose(1, 2) @ v  # (B, m, dim)
        normaliser = q_features @ k_features.sum(dim=1, keepdim=True).transpose(1, 2)  # (B, N, 1)
        mixed = (q_features @ keys_values) / (normaliser + self.EPS)  # (B, N, dim)
        # The input is wider than the output, so v, not the input, carries the residual.
        return v + self.proj_drop(self.proj(mixed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """Single-head softmax attention that narrows the tokens, (B, N, in_dim) -> (B, N, dim); v carries the residual."""

    def __init__(self, in_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.qkv = nn.Linear(in_dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # Scaled by the input width, not the head width, as in the original.
        self.scale = in_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, N, dim): one head
        mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, 1, N, dim)
        # The input is wider than the output, so v, not the input, carries the residual.
        return v.squeeze(1) + self.proj(mixed.squeeze(1))


class TransformerTokenLayer(nn.Module):
    """Single-head transformer T2T layer: (B, N, in_dim) -> (B, N, dim) at O(N²) cost."""

    def __init__(self, in_dim: int, dim: int = 64, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = TokenAttention(in_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


TOKEN_LAYERS: dict[str, type[nn.Module]] = {"performer": PerformerTokenLayer, "transformer": TransformerTokenLayer}


class TokensToToken(nn.Module):
    """The T2T module: (B, in_chans, H, W) -> (B, H/16·W/16, embed_dim) for H, W multiples of 16.

    Soft split, T2T layer, back to a grid; again; a last soft split and a linear projection.
    """

    def __init__(
        self, img_size: int, in_chans: int, embed_dim: int, token_dim: int = 64, token_layer: str = "performer"
    ) -> None:
        super().__init__()
        if token_layer not in TOKEN_LAYERS:
            raise ValueError(f"token_layer must be one of {sorted(TOKEN_LAYERS)}, got {token_layer!r}")
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        layer = TOKEN_LAYERS[token_layer]
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        grid = img_size
        for split in (self.soft_split0, self.soft_split1, self.soft_split2):
            grid = _split_size(grid, split)
        self.grid_size = (grid, grid)  # the output tokens' grid, raster order

    @staticmethod
    def _soft_split(split: nn.Unfold, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H'·W', C·k·k): one token per window."""
        return split(x).transpose(1, 2)

    @staticmethod
    def _to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H·W, C) -> (B, C, H, W)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        grid0 = (_split_size(H, self.soft_split0), _split_size(W, self.soft_split0))
        grid1 = (_split_size(grid0[0], self.soft_split1), _split_size(grid0[1], self.soft_split1))
        x = self.attention1(self._soft_split(self.soft_split0, x))  # (B, H/4·W/4, token_dim)
        x = self.attention2(self._soft_split(self.soft_split1, self._to_grid(x, grid0)))  # (B, H/8·W/8, token_dim)
        x = self._soft_split(self.soft_split2, self._to_grid(x, grid1))  # (B, H/16·W/16, 9·token_dim)
        return self.project(x)  # (B, H/16·W/16, embed_dim)


class T2TViT(LinearClassifier, nn.Module):
    """Tokens-to-Token ViT: the T2T module, a class token, a fixed sinusoid position table and timm `Block`s."""

    global_pool = "token"

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        token_layer: str = "performer",
        token_dim: int = 64,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1

        self.tokens_to_token = TokensToToken(img_size, in_chans, embed_dim, token_dim, token_layer)
        num_patches = math.prod(self.tokens_to_token.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learnt; a frozen Parameter rather than a buffer, as in the original, so that it is
        # saved and counted alike.
        self.pos_embed = nn.Parameter(sinusoid_position_table(num_patches + 1, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)

        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *(
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=False,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    norm_layer=nn.LayerNorm,  # eps 1e-5 as in the original; timm's Block defaults to 1e-6
                )
                for rate in rates
            )
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = linear_head(embed_dim, num_classes)

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_weights)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 1 + H/16·W/16, embed_dim), normalised; the class token first."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but the model was built for img_size {self.img_size} "
                f"(its position table holds {self.pos_embed.shape[1]} positions)"
            )
        x = self.tokens_to_token(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])  # (B, 1 + N, D) -> (B, D): the class token
        return x if pre_logits else self.head(x)


# The published variants; each entry only sets constructor arguments.
_VARIANTS: dict[str, dict[str, Any]] = {
    "t2t_vit_7": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_t_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, token_layer="transformer"),
    "t2t_vit_t_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, token_layer="transformer"),
    "t2t_vit_t_24": dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0, token_layer="transformer"),
}


def t2t_vit_variants() -> dict[str, dict[str, Any]]:
    """The constructor arguments of every named variant."""
    return {name: dict(args) for name, args in _VARIANTS.items()}


register_variants(
    __name__,
    T2TViT,
    _VARIANTS,
    "; the released T2T-ViT checkpoints also need their attention scale folded into the q weights "
    "(see the supernets.families.t2t_vit.t2t_vit docstring)",
)

"""The T2T-ViT supernet: unified MSA and gated MLPs in the backbone blocks, plus searchable depth and width.

Per block, as for ViT: the token mixer (skip < bconv1 < bconv3 < msa, the convs on the (img/16)² token grid the
T2T module makes; the class token gets a zero update from them) and the kept MLP hidden units, both gated.

Depth and width are discrete dimensions without gates (the Optuna search chooses them), shared slimmable style:

- depth d: the subnet runs the first d blocks; `Architecture.blocks` holds one entry per block it runs, so
  the depth is simply `arch.depth`. The supernet offers every depth from ceil(depth/2) to all blocks.
- width: the head width dh stays fixed and the subnet keeps the first h heads, so its width is
  `embed_dim` = h·dh (the architecture's `embed_dim` and `num_heads` fields). Every layer uses the first
  `embed_dim` channels: rows of the T2T projection, the class token, the position table, the norms, the rows
  and columns of the first h heads in qk, v and proj (and z's first h rows), fc1's inputs and fc2's outputs,
  the head's columns. The MLP hidden units keep their own indices (`mlp_kept`, within the supernet's hidden
  size). The supernet offers every head count from ceil(heads/2) to all heads.

Width follows the tokens: norms, blocks and head compute with as many channels as their input has, so only
the T2T projection, which makes the tokens, is told the width (`fix_architecture`). With no architecture
fixed, the supernet runs at full depth and width, its mixers and MLP units driven by the gates.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ...architecture import Architecture
from ...base import Supernet, check_input_size
from ...layers.gates import GateConfig
from ...layers.slimmable import SlimmableLayerNorm, SlimmableLinear
from ...layers.super_block import SuperBlock
from .t2t_vit import T2TViT

__all__ = [
    "SlimmableLayerNorm",
    "SlimmableLinear",
    "T2TSuperBlock",
    "T2TViTSupernet",
    "t2t_discrete_choices",
    "validate_t2t_architecture",
]


def t2t_discrete_choices(depth: int, num_heads: int, head_dim: int) -> dict[str, list[int]]:
    """The depths, widths and head counts a T2T-ViT supernet of `depth` blocks and `num_heads` heads offers."""
    heads = list(range(math.ceil(num_heads / 2), num_heads + 1))
    return {
        "depth": list(range(math.ceil(depth / 2), depth + 1)),
        "embed_dim": [h * head_dim for h in heads],
        "num_heads": heads,
    }


def validate_t2t_architecture(
    arch: Architecture,
    *,
    model: str,
    img_size: int,
    num_classes: int,
    mlp_hidden: Sequence[int],
    embed_dim: int,
    num_heads: int,
) -> None:
    """Raise `ValueError` naming the field if `arch` is not a subnet of the T2T-ViT supernet described: a block
    per entry of `mlp_hidden` (the hidden sizes), width `embed_dim` and `num_heads` heads."""
    head_dim = embed_dim // num_heads
    choices = t2t_discrete_choices(len(mlp_hidden), num_heads, head_dim)
    arch.validate_for(model=model, img_size=img_size, num_classes=num_classes, mlp_hidden=mlp_hidden, choices=choices)
    if arch.embed_dim != arch.num_heads * head_dim:
        raise ValueError(
            f"embed_dim: {arch.embed_dim} is not num_heads × the head width, {arch.num_heads} × {head_dim}"
        )


class T2TSuperBlock(SuperBlock):
    """A T2T-ViT backbone block as a `SuperBlock` whose norms also run slimmed (the unified MSA and MLP do)."""

    @classmethod
    def from_t2t(cls, block: Block, grid_size: tuple[int, int], gates: GateConfig) -> T2TSuperBlock:
        converted = cls.from_timm(block, grid_size, num_prefix_tokens=1, gates=gates)  # the class token
        converted.norm1 = SlimmableLayerNorm.from_norm(converted.norm1)
        converted.norm2 = SlimmableLayerNorm.from_norm(converted.norm2)
        return converted


class T2TViTSupernet(Supernet):
    """Our `T2TViT` converted by copying its weights: the T2T module, class token and position table, the blocks
    as `T2TSuperBlock`s, the final norm and the head, all able to run at the width of a fixed architecture."""

    def adopt(self, model: T2TViT, name: str, gates: GateConfig) -> None:
        self.name = name
        self.img_size = model.img_size
        self.in_chans = model.in_chans
        self.num_classes = model.num_classes
        self.embed_dim = model.embed_dim
        self.num_heads = model.blocks[0].attn.num_heads
        self.head_dim = model.blocks[0].attn.head_dim
        self.num_prefix_tokens = 1

        self.tokens_to_token = copy.deepcopy(model.tokens_to_token)
        self.tokens_to_token.project = SlimmableLinear.from_linear(model.tokens_to_token.project)
        self.grid_size = self.tokens_to_token.grid_size
        self.cls_token = copy.deepcopy(model.cls_token)  # (1, 1, D)
        self.pos_embed = copy.deepcopy(model.pos_embed)  # (1, 1 + N, D), frozen
        self.pos_drop = copy.deepcopy(model.pos_drop)
        self.blocks = nn.Sequential(*[T2TSuperBlock.from_t2t(b, self.grid_size, gates) for b in model.blocks])
        self.norm = SlimmableLayerNorm.from_norm(model.norm)
        self.head_drop = copy.deepcopy(model.head_drop)
        self.head = SlimmableLinear.from_linear(model.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        check_input_size(x, self.name, self.img_size)
        width = self.embed_dim if self._fixed is None else self._fixed.embed_dim
        depth = self.depth if self._fixed is None else self._fixed.depth
        x = self.tokens_to_token(x)  # (B, N, width): the projection's first `width` rows
        cls_token = self.cls_token[..., :width].expand(x.shape[0], -1, -1)  # (B, 1, width)
        x = self.pos_drop(torch.cat([cls_token, x], dim=1) + self.pos_embed[..., :width])  # (B, 1 + N, width)
        for block in self.blocks[:depth]:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1 + N, width)
        return self.head(self.head_drop(x[:, 0]))  # the class token, through the head's first `width` columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- the architecture -------------------------------------------------------------------------

    def discrete_choices(self) -> dict[str, list[int]]:
        """The values of the dimensions without gates: `depth`, `embed_dim` and `num_heads` (paired by index)."""
        return t2t_discrete_choices(self.depth, self.num_heads, self.head_dim)

    def dense_architecture(self, embed_dim: int | None = None) -> Architecture:
        """Every block msa and every hidden unit kept, at full depth and width `embed_dim` (default: full)."""
        embed_dim = embed_dim or self.embed_dim
        arch = super().dense_architecture()
        return arch.with_extras(embed_dim=embed_dim, num_heads=embed_dim // self.head_dim)

    def architecture(self) -> Architecture:
        """The deterministic choice of the current gates (logit > 0), at full depth and width."""
        return super().architecture().with_extras(embed_dim=self.embed_dim, num_heads=self.num_heads)

    def validate_choices(self, arch: Architecture) -> None:
        validate_t2t_architecture(
            arch,
            model=self.name,
            img_size=self.img_size,
            num_classes=self.num_classes,
            mlp_hidden=self.mlp_hidden,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
        )

    def fix_architecture(self, arch: Architecture) -> None:
        """Compute exactly `arch` from now on, at its width."""
        super().fix_architecture(arch)
        self.tokens_to_token.project.out_width = arch.embed_dim

    def release_architecture(self) -> None:
        """Go back to full depth and width, and to gate-driven forwards (sampled in training, logit > 0 in eval)."""
        super().release_architecture()
        self.tokens_to_token.project.out_width = None

    def stem_and_head_state(self, embed_dim: int | None = None) -> dict[str, torch.Tensor]:
        """The state outside the blocks that width `embed_dim` (default: the fixed architecture's) uses, by
        state-dict name: the full T2T layers, and the first `embed_dim` channels of the rest (views)."""
        if embed_dim is None:
            embed_dim = self.embed_dim if self._fixed is None else self._fixed.embed_dim
        project = self.tokens_to_token.project
        sliced = {
            "tokens_to_token.project.weight": project.weight[:embed_dim],  # (D', 9·token_dim)
            "tokens_to_token.project.bias": project.bias[:embed_dim],
            "cls_token": self.cls_token[..., :embed_dim],  # (1, 1, D')
            "pos_embed": self.pos_embed[..., :embed_dim],  # (1, 1 + N, D')
            "norm.weight": self.norm.weight[:embed_dim],
            "norm.bias": self.norm.bias[:embed_dim],
            "head.weight": self.head.weight[:, :embed_dim],  # (classes, D')
        }
        outside = {k: v for k, v in self.state_dict().items() if not k.startswith("blocks.")}
        return outside | {k: v.detach() for k, v in sliced.items()}

    def fixed_parameter_counts(self) -> dict[str, int]:
        """Parameters outside the blocks at the fixed architecture's width, per top-level child; `tokens` holds
        the class token and position table (the lookup table's fixed rows)."""
        counts: Counter[str] = Counter()
        for name, tensor in self.stem_and_head_state().items():
            counts[name.split(".")[0] if "." in name else "tokens"] += tensor.numel()
        return dict(counts)

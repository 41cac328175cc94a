"""The DeiT/ViT supernet: timm's `VisionTransformer` with unified MSA and gated MLPs in every block.

A timm model is converted by copying its weights; every module outside the blocks (patch embedding,
tokens, norms, head) is kept as it is, so the dense architecture computes exactly what timm computes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc
from torch import nn

from .architecture import MIXERS, Architecture, BlockChoice
from .gates import BinaryGates, GateConfig
from .unified_attention import UnifiedAttention, mixer_index
from .unified_mlp import UnifiedMlp


def unsupported_features(model: nn.Module) -> list[str]:
    """Why a timm model cannot become a ViT supernet; empty when it can."""
    if type(model) is not VisionTransformer:
        return [f"model class {type(model).__name__} (only timm's VisionTransformer is supported)"]
    reasons = []
    if type(model.patch_embed) is not PatchEmbed:
        reasons.append(f"patch embedding {type(model.patch_embed).__name__} (needs a plain PatchEmbed grid)")
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
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
            reasons.append(f"block {i} MLP {type(block.mlp).__name__} (needs a plain Mlp without norm)")
            break
    return reasons


def check_input_size(x: torch.Tensor, name: str, img_size: int) -> None:
    """Raise a `ValueError` unless x (B, C, H, W) holds img_size × img_size images: the conv candidates work on
    a fixed token grid, even where timm allows dynamic sizes."""
    if x.shape[-2:] != (img_size, img_size):
        raise ValueError(f"'{name}' takes {img_size}x{img_size} images, got {x.shape[-2]}x{x.shape[-1]}")


def adopt_patch_grid(stem_and_head: nn.Module, model: nn.Module, name: str, reasons: list[str]) -> None:
    """Refuse `model` for `reasons` or for non-square images; else give `stem_and_head` the settings every patch-grid
    family's stem and head keep: name, img_size, num_classes, grid_size, global_pool, embed_dim."""
    if reasons:
        raise ValueError(f"'{name}' cannot be searched or pruned: {'; '.join(reasons)}")
    img_h, img_w = model.patch_embed.img_size
    if img_h != img_w:
        raise ValueError(f"'{name}': only square images are supported, got {img_h}x{img_w}")
    stem_and_head.name = name
    stem_and_head.img_size = img_h
    stem_and_head.num_classes = model.num_classes
    stem_and_head.grid_size = tuple(model.patch_embed.grid_size)
    stem_and_head.global_pool = model.global_pool
    stem_and_head.embed_dim = model.embed_dim


def input_channels(model: nn.Module) -> int:
    """The image channels a supernet or subnet takes: its `in_chans` where it has one (T2T-ViT, which has no
    patch embedding), else its patch embedding's."""
    return model.in_chans if hasattr(model, "in_chans") else model.patch_embed.proj.in_channels


class SuperBlock(nn.Module):
    """timm's pre-norm `Block` with a unified MSA and a gated MLP."""

    def __init__(self, block: Block, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig):
        super().__init__()
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = UnifiedAttention.from_timm(block.attn, grid_size, num_prefix_tokens, gates)
        self.ls1 = copy.deepcopy(block.ls1)
        self.drop_path1 = copy.deepcopy(block.drop_path1)
        self.norm2 = copy.deepcopy(block.norm2)
        self.mlp = UnifiedMlp.from_timm(block.mlp, gates)
        self.ls2 = copy.deepcopy(block.ls2)
        self.drop_path2 = copy.deepcopy(block.drop_path2)

    def mixer_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn.chosen_mixer() != "skip":  # a skipped mixer costs nothing, its norm included
            x = x + self.drop_path1(self.mixer_branch(x))
        return x + self.drop_path2(self.mlp_branch(x))

    def mixer_parameters(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        """The parameters a subnet needs for `mixer` in this block's mixer branch, for tokens of width `dim`
        (default: the full width; slimmed tokens use slices, e.g. the norm's first `dim` channels)."""
        if mixer == "skip":
            return []
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


class Supernet(nn.Module):
    """The search space as the search loop, lookup table, projection, Optuna search and exporter see it, shared by
    every family: `blocks` of `SuperBlock`s (a unified MSA `attn`, a gated MLP `mlp`, `mixer_branch` and
    `mlp_branch`), each applied as `block_passes` says, the model's identity, and `patch_embed.proj` (or `in_chans`,
    see `input_channels`) for the image's channels. A family adds its stem and head and sets the attributes below
    in its `__init__`."""

    name: str
    img_size: int
    num_classes: int
    model_kwargs: dict[str, Any]
    gate_config: GateConfig
    blocks: nn.Sequential
    _fixed: Architecture | None

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_draw_before_forward)
        self.register_forward_hook(_forget_draw_after_forward, always_call=True)

    def draw_gates(self) -> None:
        """Draw every block's attention gates for one training forward, and read the mixers they pick back from the
        device once for all blocks: the single path must be known on the host, and one read per block would stall
        the GPU once per block."""
        attentions = [block.attn for block in self.blocks]
        cumulative = [attn.draw_gates() for attn in attentions]
        counts = torch.stack([c.detach() for c in cumulative]).sum(1).tolist()  # the step's one host read
        for attn, c, count in zip(attentions, cumulative, counts, strict=True):
            attn.drawn = (c, MIXERS[int(count)])

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def mlp_hidden(self) -> list[int]:
        return [b.mlp.hidden_features for b in self.blocks]

    def block_passes(self, index: int) -> list[dict[str, Any]]:
        """The keyword arguments of each application of block `index` in one forward (the lookup table prices each):
        one plain call, unless a family applies its blocks recursively (SReT)."""
        return [{}]

    def config(self) -> dict[str, Any]:
        """Everything `build_supernet` needs to rebuild this supernet, as JSON-ready data."""
        return {
            "model": self.name,
            "img_size": self.img_size,
            "num_classes": self.num_classes,
            "model_kwargs": self.model_kwargs,
            "gates": self.gate_config.to_dict(),
        }

    # -- the architecture -------------------------------------------------------------------------

    def dense_architecture(self) -> Architecture:
        blocks = [BlockChoice("msa", tuple(range(h))) for h in self.mlp_hidden]
        return Architecture(self.name, self.img_size, self.num_classes, tuple(blocks))

    def architecture(self) -> Architecture:
        """The deterministic choice of the current gates (logit > 0), read from the device at once."""
        mixers = mixer_index(torch.stack([b.attn.gates.is_on() for b in self.blocks]))  # (depth,)
        mlp_on = torch.cat([b.mlp.gates.is_on() for b in self.blocks]).to(torch.int64)  # (Σ hidden,)
        values = torch.cat([mixers, mlp_on]).tolist()
        mixer_counts, mlp_flags = values[: self.depth], values[self.depth :]
        blocks, start = [], 0
        for count, hidden in zip(mixer_counts, self.mlp_hidden, strict=True):
            kept = tuple(i for i, on in enumerate(mlp_flags[start : start + hidden]) if on)
            blocks.append(BlockChoice(MIXERS[count], kept))
            start += hidden
        return Architecture(self.name, self.img_size, self.num_classes, tuple(blocks))

    def validate_architecture(self, arch: Architecture) -> None:
        arch.validate_for(
            model=self.name, img_size=self.img_size, num_classes=self.num_classes, mlp_hidden=self.mlp_hidden
        )

    def fix_architecture(self, arch: Architecture) -> None:
        """Compute exactly `arch` from now on: only each block's mixer, only its kept hidden units."""
        self.validate_architecture(arch)
        device = self.blocks[0].mlp.fc1.weight.device
        for block, choice in zip(self.blocks, arch.blocks, strict=True):
            block.attn.fixed_mixer = choice.mixer
            block.mlp.fixed_kept = torch.tensor(choice.mlp_kept, dtype=torch.long, device=device)
        self._fixed = arch

    def release_architecture(self) -> None:
        """Go back to gate-driven forwards (sampled in training, logit > 0 in eval)."""
        for block in self.blocks:
            block.attn.fixed_mixer = None
            block.mlp.fixed_kept = None
        self._fixed = None

    @property
    def fixed_architecture(self) -> Architecture | None:
        return self._fixed

    def set_gate_generator(self, generator: torch.Generator | None) -> None:
        """Draw every gate sample from `generator` (e.g. one seed on all DDP ranks to synchronise them)."""
        for module in self.modules():
            if isinstance(module, BinaryGates):
                module.generator = generator

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "reg_token", "pos_embed"}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits, which train with their own optimizer and no weight decay."""
        return [m.logits for m in self.modules() if isinstance(m, BinaryGates)]


def _draw_before_forward(net: Supernet, _args: Any) -> None:
    if net.training and net.fixed_architecture is None:
        net.draw_gates()


def _forget_draw_after_forward(net: Supernet, _args: Any, _output: Any) -> None:
    for block in net.blocks:
        block.attn.drawn = None


class VisionTransformerSupernet(ViTStemAndHead, Supernet):
    def __init__(
        self,
        vit: VisionTransformer,
        name: str,
        model_kwargs: dict[str, Any] | None = None,
        gates: GateConfig = GateConfig(),
    ) -> None:
        super().__init__()
        self.adopt_stem_and_head(vit, name)
        self.model_kwargs = dict(model_kwargs or {})
        self.gate_config = gates
        self.blocks = nn.Sequential(*[SuperBlock(b, self.grid_size, self.num_prefix_tokens, gates) for b in vit.blocks])
        self._fixed = None

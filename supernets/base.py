"""The bases every family builds on: `Supernet`, the search space as the search, lookup table and exporter see
it, and `Subnet`, the plain model a fixed architecture exports to; and the helpers their stems share."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, PatchEmbed
from torch import nn

from .architecture import MIXERS, Architecture, BlockChoice, check_fields, check_type
from .layers.gates import BinaryGates, GateConfig
from .layers.plain import BottleneckConv
from .layers.unified_attention import mixer_index
from .registry import check_model_name, create_source_model

_CONFIG_FIELDS = ("model_kwargs", "fold_bn")


def check_input_size(x: torch.Tensor, name: str, img_size: int) -> None:
    """Raise a `ValueError` unless x (B, C, H, W) holds img_size × img_size images: the conv candidates work on
    a fixed token grid, even where timm allows dynamic sizes."""
    if x.shape[-2:] != (img_size, img_size):
        raise ValueError(f"'{name}' takes {img_size}x{img_size} images, got {x.shape[-2]}x{x.shape[-1]}")


def patch_model_reasons(model: nn.Module, model_class: type[nn.Module], expected: str) -> list[str]:
    """The first reasons a model of a patch-grid family can fail: another class than `model_class` (`expected`
    says which), or a patch embedding other than timm's plain grid."""
    if type(model) is not model_class:
        return [f"model class {type(model).__name__} ({expected})"]
    if type(model.patch_embed) is not PatchEmbed:
        return [f"patch embedding {type(model.patch_embed).__name__} (needs a plain PatchEmbed grid)"]
    return []


def plain_mlp_reason(index: int, mlp: nn.Module) -> str | None:
    """Why block `index`'s MLP cannot be gated unit by unit: anything but timm's plain `Mlp` without a norm."""
    if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
        return f"block {index} MLP {type(mlp).__name__} (needs a plain Mlp without norm)"
    return None


def adopt_patch_grid(stem_and_head: nn.Module, model: nn.Module, name: str, reasons: list[str]) -> None:
    """Refuse `model` for `reasons` or for non-square images; else give `stem_and_head` the settings every patch-grid
    family's stem and head keep: name, img_size, num_classes, grid_size, global_pool, embed_dim, in_chans."""
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
    stem_and_head.in_chans = model.patch_embed.proj.in_channels


class Supernet(nn.Module):
    """The search space as the search loop, lookup table, projection, Optuna search and exporter see it, shared by
    every family: `blocks` of `SuperBlock`s (a unified MSA `attn`, a gated MLP `mlp`, `mixer_branch` and
    `mlp_branch`), each applied as `block_passes` says, and the model's identity. A family adds its stem and head
    and sets the attributes below in its `__init__`."""

    name: str
    img_size: int
    in_chans: int  # the image's channels
    num_classes: int
    model_kwargs: dict[str, Any]
    gate_config: GateConfig
    blocks: nn.Sequential
    _fixed: Architecture | None

    def __init__(
        self,
        source: nn.Module,
        name: str,
        model_kwargs: dict[str, Any] | None = None,
        gates: GateConfig = GateConfig(),
    ) -> None:
        """Convert timm model `source` (built as `name` with `model_kwargs`) by copying its weights."""
        super().__init__()
        self.model_kwargs = dict(model_kwargs or {})
        self.gate_config = gates
        self._fixed = None
        self.adopt(source, name, gates)
        self.register_forward_pre_hook(_draw_before_forward)
        self.register_forward_hook(_forget_draw_after_forward, always_call=True)

    def adopt(self, source: nn.Module, name: str, gates: GateConfig) -> None:
        """Take over `source`'s stem, tokens and head, and make its blocks `blocks` with gates of `gates`: the
        family's part of the conversion."""
        raise NotImplementedError

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

    def discrete_choices(self) -> dict[str, list[Any]]:
        """The values of the choices without gates it offers, by name (depth and the family's architecture fields,
        as `Architecture.validate_for` takes them); none by default."""
        return {}

    def fixed_parameter_counts(self) -> dict[str, int]:
        """Parameters outside the blocks, per top-level child; `tokens` holds the net's own (class token, position
        embeddings). Gate logits are search-only and not counted. A family that also slims what lies outside its
        blocks counts the parts its fixed architecture's width uses itself."""
        counts = {
            name: sum(p.numel() for p in child.parameters())
            for name, child in self.named_children()
            if name != "blocks"
        }
        counts["tokens"] = sum(p.numel() for p in self.parameters(recurse=False))
        return counts

    def block_passes(self, index: int) -> list[dict[str, Any]]:
        """The keyword arguments of each application of block `index` in one forward (the lookup table prices each):
        one plain call, unless a family applies its blocks recursively."""
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
        return self.architecture_of(blocks)

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
        return self.architecture_of(blocks)

    def architecture_of(self, blocks: Sequence[BlockChoice], extras: dict[str, Any] | None = None) -> Architecture:
        """The architecture of this supernet with `blocks` (and a family's `extras`), its skip blocks as the
        supernet's."""
        return Architecture(
            self.name, self.img_size, self.num_classes, tuple(blocks), extras or {}, self.gate_config.skip_mixer
        )

    def validate_architecture(self, arch: Architecture) -> None:
        """Raise `ValueError` naming the field if `arch` is not one of this supernet's subnets."""
        self.validate_choices(arch)
        if arch.skip_mixer != self.gate_config.skip_mixer:
            raise ValueError(
                f"skip_mixer: the architecture's skip blocks are '{arch.skip_mixer}', the supernet's "
                f"'{self.gate_config.skip_mixer}'"
            )

    def validate_choices(self, arch: Architecture) -> None:
        """Raise `ValueError` naming the field if `arch`'s choices do not fit the supernet: model, size, depth, the
        kept units and a family's own fields."""
        arch.validate_for(
            model=self.name, img_size=self.img_size, num_classes=self.num_classes, mlp_hidden=self.mlp_hidden
        )

    def fix_architecture(self, arch: Architecture) -> None:
        """Compute exactly `arch` from now on: only each block's mixer, only its kept hidden units (and, in a
        family with depth choices, only its first `arch.depth` blocks)."""
        self.validate_architecture(arch)
        self.release_architecture()  # the blocks past a shallower architecture's depth keep no choice
        device = self.blocks[0].mlp.fc1.weight.device
        for block, choice in zip(self.blocks, arch.blocks, strict=False):
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

    def set_skip_mixer(self, skip_mixer: str) -> None:
        """Make every skip candidate `skip_mixer`: a new affine skip starts at s = 1, t = 0 (what the identity
        computes), and going back to the identity drops the learnt s and t."""
        self.gate_config = dataclasses.replace(self.gate_config, skip_mixer=skip_mixer)  # checks the name
        for block in self.blocks:
            block.attn.set_skip_mixer(skip_mixer)

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


def imagenet_data_config(in_chans: int, arch: Architecture, crop_pct: float) -> dict[str, Any]:
    """timm's data config (`timm.data.resolve_model_data_config`) of a family trained with ImageNet's usual
    settings (bicubic, mean/std), at the architecture's fixed input size: the conv candidates need one grid."""
    return {
        "input_size": (in_chans, arch.img_size, arch.img_size),
        "fixed_input_size": True,
        "num_classes": arch.num_classes,
        "interpolation": "bicubic",
        "crop_pct": crop_pct,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
    }


class Subnet(nn.Module):
    """What every family's exported model shares: it is built from data alone, one `Architecture` plus
    `config()`, and its bconv layers can fold their BN. A family's `__init__(arch, model_kwargs, fold_bn)` calls
    `create_source` and builds its stem, head and blocks from the model it returns; the family names itself in
    `family`, which `config()` records (ViT's records none, as subnets saved before there were other families do)."""

    family: ClassVar[str | None] = None
    arch: Architecture
    in_chans: int  # the image's channels
    model_kwargs: dict[str, Any]
    bn_folded: bool

    def create_source(self, arch: Architecture, model_kwargs: dict[str, Any] | None, fold_bn: bool) -> nn.Module:
        """The timm model `arch.model`, created for its structure and checked against `arch`; records what
        rebuilds this subnet (`config()`) and timm's data config.

        It is created on the ambient device: build under `torch.device("meta")` to skip allocating and
        initialising weights that a state dict replaces anyway.
        """
        check_model_name(arch.model)
        kwargs = dict(model_kwargs or {})
        source = create_source_model(arch.model, img_size=arch.img_size, num_classes=arch.num_classes, **kwargs)
        mlp_hidden = [b.mlp.fc1.out_features for b in self.source_blocks(source)]  # the architecture must fit these
        arch.validate_for(model=arch.model, img_size=arch.img_size, num_classes=arch.num_classes, mlp_hidden=mlp_hidden)
        # timm's data config (mean, std, crop) for `timm.data.resolve_model_data_config`; the grid is fixed.
        image = (source.patch_embed.proj.in_channels, arch.img_size, arch.img_size)
        data_config = {"input_size": image, "fixed_input_size": True, "num_classes": arch.num_classes}
        self.record_source(arch, kwargs, fold_bn, source.pretrained_cfg | data_config)
        return source

    @staticmethod
    def source_blocks(source: nn.Module) -> list[nn.Module]:
        """The blocks of the family's timm model, in order (a family with stages lists them all)."""
        return list(source.blocks)

    def record_source(
        self, arch: Architecture, model_kwargs: dict[str, Any], fold_bn: bool, pretrained_cfg: dict[str, Any]
    ) -> None:
        """Record what rebuilds this subnet (`config()`, with `arch`) and timm's data config for it (a family that
        builds its source model itself calls this instead of `create_source`)."""
        self.arch = arch
        self.model_kwargs = dict(model_kwargs)
        self.bn_folded = fold_bn
        self.pretrained_cfg = pretrained_cfg

    @classmethod
    def from_config(cls, config: Any, arch: Architecture) -> Subnet:
        """Build from `config()`'s data (as parsed from JSON), checking it field by field."""
        check_type("subnet config", config, dict)
        check_fields("", config, _CONFIG_FIELDS if cls.family is None else ("family", *_CONFIG_FIELDS))
        if config.get("family") != cls.family:
            raise ValueError(f"family: the config is for {config['family']!r}, not {cls.family!r}")
        check_type("model_kwargs", config["model_kwargs"], dict)
        check_type("fold_bn", config["fold_bn"], bool)
        return cls(arch, config["model_kwargs"], config["fold_bn"])

    def config(self) -> dict[str, Any]:
        """What besides the architecture rebuilds this subnet's modules, as JSON-ready data."""
        family = {} if self.family is None else {"family": self.family}
        return family | {"model_kwargs": self.model_kwargs, "fold_bn": self.bn_folded}

    def fold_batch_norm(self) -> Subnet:
        """Fold every bconv's BN into its conv, for inference; returns self."""
        for module in self.modules():
            if isinstance(module, BottleneckConv):
                module.fold_batch_norm()
        self.bn_folded = True
        return self

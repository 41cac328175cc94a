"""The plain modules a fixed architecture is built from, and `VisionTransformerSubnet`, the exported model.

No gates and no search code: a subnet is timm's ViT whose blocks hold what one `Architecture` chose,
standard attention (msa), a bottleneck convolution (bconv1, bconv3) or no token mixer at all (skip), and
an MLP cut to its kept hidden units. It is built from data alone, the architecture plus a small config
(the source model's timm kwargs, whether BN is folded), so that loading a saved subnet needs no
supernet; its weights then come by name through `load_state_dict`.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, Mlp, to_2tuple
from timm.models.vision_transformer import Block
from torch import nn

from .architecture import CONV_KERNEL_SIZE, Architecture, BlockChoice, check_fields, check_type
from .registry import check_model_name, create_source_model
from .vit import ViTStemAndHead

_CONFIG_FIELDS = ("model_kwargs", "fold_bn")


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


class BottleneckConv(nn.Module):
    """bconv_k, a unified MSA's conv candidate as a layer of its own: conv(D → dh, k×k) → BN(dh) → ReLU →
    linear(dh → D) over the patch-token grid. Prefix tokens (class, registers) get a zero update, as in
    the search. With `fold_bn` the BN is folded into the conv (the inference form), which then has a bias."""

    def __init__(
        self,
        dim: int,
        head_dim: int,
        kernel_size: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        conv_bias: bool = True,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.conv = nn.Conv2d(dim, head_dim, kernel_size, padding=kernel_size // 2, bias=conv_bias or fold_bn)
        self.bn: nn.Module = nn.Identity() if fold_bn else nn.BatchNorm2d(head_dim)
        self.act = nn.ReLU()
        self.proj = nn.Linear(head_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(
        cls, attn: nn.Module, kernel_size: int, grid_size: tuple[int, int], num_prefix_tokens: int, fold_bn: bool
    ) -> BottleneckConv:
        """The bconv shaped like the unified MSA converted from `attn` (a conv bias where v has one); any attention
        with qkv and proj layers (timm's, CaiT's talking heads, SReT's sliced one)."""
        return cls(
            attn.qkv.in_features,
            attn.proj.in_features // attn.num_heads,  # the head width; not every attention stores it
            kernel_size,
            grid_size,
            num_prefix_tokens,
            conv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            proj_drop=attn.proj_drop.p,
            fold_bn=fold_bn,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D), N = prefix + gh·gw tokens
        B, _, D = x.shape
        gh, gw = self.grid_size
        # A channels-last view: the conv reads it as is, and its output flattens back to tokens without a copy.
        grid = x[:, self.num_prefix_tokens :].reshape(B, gh, gw, D).permute(0, 3, 1, 2)  # (B, D, gh, gw)
        y = self.act(self.bn(self.conv(grid))).flatten(2).transpose(1, 2)  # (B, gh·gw, dh)
        y = self.proj_drop(self.proj(y))  # (B, gh·gw, D)
        return F.pad(y, (0, 0, self.num_prefix_tokens, 0))  # (B, N, D)

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Fold BN's inference-time affine into the conv: one layer fewer to run, the same eval output."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):  # already folded
            return
        scale = torch.rsqrt(bn.running_var + bn.eps)  # (dh,)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        bias = shift if self.conv.bias is None else self.conv.bias * scale + shift
        self.conv.weight = nn.Parameter(self.conv.weight * scale.view(-1, 1, 1, 1))
        self.conv.bias = nn.Parameter(bias)
        self.bn = nn.Identity()


class PlainAttention(nn.Module):
    """Standard multi-head self-attention (the msa choice): a fused qkv projection and SDPA, like timm's
    `Attention`, so that an exported msa block is the dense model's block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: Attention) -> PlainAttention:
        """The same layout as `attn`, taking over its q/k norms (identity unless the model has qk_norm)."""
        plain = cls(
            attn.qkv.in_features,
            attn.num_heads,
            head_dim=attn.head_dim,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
        )
        plain.q_norm, plain.k_norm = attn.q_norm, attn.k_norm
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, A)
        return self.proj_drop(self.proj(out))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√dh)·v per head: (B, H, N, dh) from q, k, v (B, H, N, dh)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)


class PrunedMlp(nn.Module):
    """timm's `Mlp` cut to its kept hidden units: fc1 (D → k), activation, fc2 (k → D). With k = 0 the
    output is fc2's bias on every token, which is what the supernet computes with every unit dropped."""

    def __init__(
        self, in_features: int, hidden_features: int, bias: bool | tuple[bool, bool] = True, drop: float = 0.0
    ) -> None:
        super().__init__()
        fc1_bias, fc2_bias = to_2tuple(bias)
        with warnings.catch_warnings():  # k = 0 is a legitimate choice, not a mistake to warn about
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            self.fc1 = nn.Linear(in_features, hidden_features, bias=fc1_bias)
            self.fc2 = nn.Linear(hidden_features, in_features, bias=fc2_bias)
        self.act: nn.Module = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)

    @classmethod
    def from_timm(cls, mlp: Mlp, hidden_features: int) -> PrunedMlp:
        """`mlp` with `hidden_features` units, taking over its activation and dropout."""
        pruned = cls(mlp.fc1.in_features, hidden_features, bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None))
        pruned.act, pruned.drop1, pruned.drop2 = mlp.act, mlp.drop1, mlp.drop2
        return pruned

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))  # hidden (B, N, k)


class SubnetBlock(nn.Module):
    """timm's pre-norm `Block` for one `BlockChoice`, taking over `block`'s norms, layer scales and drop paths
    (pass a model built for the purpose). A skip block has no mixer branch at all (no norm1, no layer scale):
    the residual alone, as the supernet computes it."""

    def __init__(
        self, block: Block, choice: BlockChoice, grid_size: tuple[int, int], num_prefix_tokens: int, fold_bn: bool
    ) -> None:
        super().__init__()
        self.mixer: nn.Module | None = None
        if choice.mixer == "msa":
            self.mixer = PlainAttention.from_timm(block.attn)
        elif choice.mixer != "skip":
            kernel_size = CONV_KERNEL_SIZE[choice.mixer]
            self.mixer = BottleneckConv.from_timm(block.attn, kernel_size, grid_size, num_prefix_tokens, fold_bn)
        if self.mixer is not None:
            self.norm1, self.ls1, self.drop_path1 = block.norm1, block.ls1, block.drop_path1
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2
        self.mlp = PrunedMlp.from_timm(block.mlp, len(choice.mlp_kept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        if self.mixer is not None:
            x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Subnet(nn.Module):
    """What every family's exported model shares: it is built from data alone, one `Architecture` plus
    `config()`, and its bconv layers can fold their BN. A family's `__init__(arch, model_kwargs, fold_bn)` calls
    `create_source` and builds its stem, head and blocks from the model it returns; the family names itself in
    `family`, which `config()` records (ViT's records none, as subnets saved before there were other families do)."""

    family: ClassVar[str | None] = None
    arch: Architecture
    model_kwargs: dict[str, Any]
    bn_folded: bool

    def create_source(self, arch: Architecture, model_kwargs: dict[str, Any] | None, fold_bn: bool) -> nn.Module:
        """The timm model `arch.model`, created for its structure and checked against `arch`; records what
        rebuilds this subnet (`config()`) and timm's data config.

        It is created on the ambient device: build under `torch.device("meta")` to skip allocating and
        initialising weights that a state dict replaces anyway.
        """
        self.model_kwargs = dict(model_kwargs or {})
        check_model_name(arch.model)
        source = create_source_model(
            arch.model, img_size=arch.img_size, num_classes=arch.num_classes, **self.model_kwargs
        )
        mlp_hidden = [b.mlp.fc1.out_features for b in source.blocks]  # the depth and kept indices must fit these
        arch.validate_for(model=arch.model, img_size=arch.img_size, num_classes=arch.num_classes, mlp_hidden=mlp_hidden)
        self.arch = arch
        self.bn_folded = fold_bn
        # timm's data config (mean, std, crop) for `timm.data.resolve_model_data_config`; the grid is fixed.
        image = (source.patch_embed.proj.in_channels, arch.img_size, arch.img_size)
        self.pretrained_cfg = source.pretrained_cfg | {
            "input_size": image,
            "fixed_input_size": True,
            "num_classes": arch.num_classes,
        }
        return source

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


class VisionTransformerSubnet(ViTStemAndHead, Subnet):
    """The exported subnet: timm's stem, tokens, norms and head around the blocks of one `Architecture`.

    The timm model `arch.model` is created (`Subnet.create_source`) for its structure; its stem and head
    are taken over and each block is rebuilt for its choice. `fold_bn` builds the inference form of the
    bconv layers (no BN, a conv bias); `config()` and the architecture rebuild the same modules.
    """

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        super().__init__()
        vit = self.create_source(arch, model_kwargs, fold_bn)
        self.adopt_stem_and_head(vit, arch.model)
        self.blocks = nn.Sequential(
            *[
                SubnetBlock(block, choice, self.grid_size, self.num_prefix_tokens, fold_bn)
                for block, choice in zip(vit.blocks, arch.blocks, strict=True)
            ]
        )

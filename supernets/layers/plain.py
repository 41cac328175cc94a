"""The plain layers a fixed architecture is built from: `BottleneckConv` (a bconv candidate as a real conv),
`PlainAttention`, `PrunedMlp` and `SubnetBlock`. No gates and no search code."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Self

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, to_2tuple
from timm.models.vision_transformer import Block
from torch import nn

from ..architecture import CONV_KERNEL_SIZE, BlockChoice


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
        with qkv and proj layers (timm's, or a family's variant of it)."""
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


def plain_mixer(
    choice: BlockChoice,
    attn: nn.Module,
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    fold_bn: bool,
    msa: Callable[[], nn.Module],
    skip_mixer: str = "identity",
) -> nn.Module | None:
    """The plain layer of `choice`'s mixer in a block whose attention is `attn`: `msa()` for msa, a
    `BottleneckConv` shaped like `attn` for a conv; for skip None (identity: no mixer branch), or an identity
    after the block's norm (affine: the norm computes the whole branch, s, t and layer scale folded in)."""
    if choice.mixer == "skip":
        return nn.Identity() if skip_mixer == "affine" else None
    if choice.mixer == "msa":
        return msa()
    return BottleneckConv.from_timm(attn, CONV_KERNEL_SIZE[choice.mixer], grid_size, num_prefix_tokens, fold_bn)


class SubnetBlock(nn.Module):
    """A pre-norm block for one `BlockChoice`: its plain `mixer` and its pruned MLP, each with its norm, layer
    scale and drop path (taken over from a model built for the purpose). An identity skip block (no mixer) has no
    mixer branch at all, no norm1 and no layer scale: the residual alone, as the supernet computes it."""

    def __init__(
        self,
        mixer: nn.Module | None,
        norm1: nn.Module,
        ls1: nn.Module,
        drop_path1: nn.Module,
        norm2: nn.Module,
        ls2: nn.Module,
        drop_path2: nn.Module,
        mlp: PrunedMlp,
    ) -> None:
        super().__init__()
        self.mixer = mixer
        if mixer is not None:
            self.norm1, self.ls1, self.drop_path1 = norm1, ls1, drop_path1
        self.norm2, self.ls2, self.drop_path2 = norm2, ls2, drop_path2
        self.mlp = mlp

    @classmethod
    def from_timm(
        cls,
        block: Block,
        choice: BlockChoice,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        fold_bn: bool,
        skip_mixer: str = "identity",
    ) -> Self:
        """timm's pre-norm `Block` for `choice`: standard attention for msa (`PlainAttention`); an affine skip's
        layer scale is folded into its norm."""
        attn = block.attn
        plain_msa = lambda: PlainAttention.from_timm(attn)  # noqa: E731
        mixer = plain_mixer(choice, attn, grid_size, num_prefix_tokens, fold_bn, plain_msa, skip_mixer)
        ls1 = nn.Identity() if choice.mixer == "skip" else block.ls1
        mlp = PrunedMlp.from_timm(block.mlp, len(choice.mlp_kept))
        return cls(mixer, block.norm1, ls1, block.drop_path1, block.norm2, block.ls2, block.drop_path2, mlp)

    def mixer_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer branch's update of x (B, N, D): zero for an identity skip."""
        return torch.zeros_like(x) if self.mixer is None else self.ls1(self.mixer(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch's update of x (B, N, D)."""
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        if self.mixer is not None:
            x = x + self.drop_path1(self.mixer_branch(x))
        return x + self.drop_path2(self.mlp_branch(x))

"""SReT, the Sliced Recursive Transformer (Shen, Liu and Xing, ECCV 2022): dense models, timm-registered.

A convolutional stem turns the image into a 1/8-resolution grid of tokens; three stages of pre-norm
transformer blocks follow, with a depthwise-style strided conv between stages that halves the grid
and doubles the width; the head averages the tokens (no class token). Two ideas set SReT apart:

- Recursion: a stage owns `recursive_num` blocks and applies each one `depth // recursive_num`
  times in a row (twice in every published model), so the weights are shared across passes. Every
  application is followed by its own, unshared non-linear projection layer (NLL, a small MLP), and
  all residual sums carry learnable scalars (LRC): x ← a·x + b·branch(x).
- Sliced group attention: the raster-ordered tokens are cut into G contiguous chunks with full
  multi-head attention inside each chunk, dividing the attention-matmul cost by G. Each stage has
  one G per pass. On later passes with G > 1 the tokens are permuted before slicing and put back
  in order before the output projection, so that a token meets different neighbours than on the
  first pass.

Permutation: the original draws a fresh random permutation on every forward, evaluation included,
which makes its outputs non-deterministic. Here training draws a fresh permutation from torch's
global RNG (so `torch.manual_seed` reproduces a run), while evaluation uses a fixed permutation,
drawn once per token count from a CPU `torch.Generator` seeded with the layer's `perm_seed` (every
layer gets its own seed, so layers see independent permutations, as in training). The fixed
permutation is a cache, not a buffer: it is absent from the state dict and follows the token count.

The group counts are runtime settings, not weights: `SReT.set_groups` changes them for any stage
and pass. The supernet (`sret_supernet`) searches them as `Architecture.groups`, sharing every weight.

Counting convention: with the default groups, sret_t has 4,755,979 parameters and 1.112 GMACs in
the `core` convention (linear/conv weights plus the sliced attention matmuls), 1.366 GMACs with
every G = 1. The published MACs thus count the attention matmuls at their sliced (÷G) cost.

Importing this module registers `sret_t`, `sret_lt` and `sret_s` with timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from ...entry_points import LinearClassifier, drop_path_rates, init_linear_weights, linear_head, register_variants

__all__ = [
    "SReT",
    "SReTBlock",
    "SReTStage",
    "SlicedAttention",
    "check_group_count",
    "sret_checkpoint_filter",
    "sret_variants",
    "token_permutation",
]

Groups = Sequence[Sequence[int]]


def _conv_out(size: int) -> int:
    """Output size of a 3×3, stride 2, padding 1 convolution."""
    return (size - 1) // 2 + 1


def check_group_count(groups: int, num_tokens: int, where: str = "") -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_tokens % groups:
        at = f" in {where}" if where else ""
        raise ValueError(f"group count {groups!r}{at} must be a positive integer dividing the {num_tokens} tokens")


def token_permutation(
    num_tokens: int, device: torch.device, training: bool, seed: int, cache: dict[Any, tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of `num_tokens` tokens and its inverse, for a layer with permutation seed `seed`: in training
    a fresh draw from torch's global RNG; in eval the layer's fixed one, cached in `cache` per token count and
    device."""
    if training:
        perm = torch.randperm(num_tokens, device=device)
        return perm, torch.argsort(perm)
    key = (num_tokens, device)
    if key not in cache:
        # Drawn on the CPU so that the permutation is the same whatever device the model is on.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        perm = torch.randperm(num_tokens, generator=gen, device="cpu")
        cache[key] = (perm.to(device), torch.argsort(perm).to(device))
    return cache[key]


class LearnableResidual(nn.Module):
    """x ← a·x + b·branch, with learnable scalars a and b (SReT's LRC), both starting at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta * branch


class SlicedAttention(nn.Module):
    """Multi-head self-attention inside G contiguous chunks of the token sequence.

    Laid out like timm's `Attention` (`qkv`, `proj`, `num_heads`), so its weights convert both ways.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        perm_seed: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.perm_seed = perm_seed
        self._eval_perms: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def permutation(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A permutation of the tokens and its inverse: fresh in training, fixed per token count in eval."""
        return token_permutation(num_tokens, device, self.training, self.perm_seed, self._eval_perms)

    def forward(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        check_group_count(groups, N, "attention")
        qkv = self.qkv(x)  # (B, N, 3·C)
        # Attention is permutation-equivariant, so shuffling only matters when it changes the chunks.
        perm = self.permutation(N, x.device) if permute and groups > 1 else None
        if perm is not None:
            qkv = qkv[:, perm[0]]
        # Contiguous chunks of the (possibly shuffled) sequence become extra batch entries.
        qkv = qkv.reshape(B * groups, N // groups, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B·G, heads, N/G, dh)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B·G, heads, N/G, dh) -> (B, N, C)
        if perm is not None:
            x = x[:, perm[1]]
        return self.proj_drop(self.proj(x))


class NonLinearLayer(nn.Module):
    """SReT's NLL after every block application: x ← a·x + b·MLP(LN x)."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual = LearnableResidual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.drop_path(self.mlp(self.norm(x))))


class SReTBlock(nn.Module):
    """Pre-norm transformer block with sliced attention and learnable residual scalars."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        perm_seed: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SlicedAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, perm_seed=perm_seed)
        self.residual1 = LearnableResidual()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.residual2 = LearnableResidual()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:
        x = self.residual1(x, self.drop_path(self.attn(self.norm1(x), groups, permute)))
        return self.residual2(x, self.drop_path(self.mlp(self.norm2(x))))


class ConvStem(nn.Module):
    """Three 3×3 stride-2 conv + BN + ReLU layers: (B, 3, H, W) -> (B, C, H/8, W/8)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        widths = [in_chans, dim // 2, dim, dim]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvPool(nn.Module):
    """Grouped 3×3 stride-2 conv (one group per input channel) that halves the grid and widens C -> 2·C."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SReTStage(nn.Module):
    """An optional downsampling conv, then `recursive_num` blocks, each applied `passes` times.

    Works on (B, C, H, W) grids; the blocks see the grid as raster-ordered tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int,
        recursive_num: int,
        groups: Sequence[int],
        grid_size: tuple[int, int],
        mlp_ratio: float,
        nll_ratio: float,
        in_dim: int | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] | None = None,
        perm_seed: int = 0,
    ) -> None:
        super().__init__()
        if recursive_num < 1 or depth % recursive_num:
            raise ValueError(f"depth {depth} must be a positive multiple of recursive_num {recursive_num}")
        self.passes = depth // recursive_num
        self.grid_size = grid_size
        self.downsample: nn.Module = ConvPool(in_dim, dim) if in_dim is not None else nn.Identity()
        drop_path = list(drop_path) if drop_path is not None else [0.0] * depth
        # A shared block's stochastic depth follows its first application.
        self.blocks = nn.ModuleList(
            SReTBlock(dim, num_heads, mlp_ratio, drop, attn_drop, drop_path[i * self.passes], perm_seed + i)
            for i in range(recursive_num)
        )
        self.nlls = nn.ModuleList(NonLinearLayer(dim, nll_ratio, drop, drop_path[i]) for i in range(depth))
        self.groups: tuple[int, ...] = ()
        self.set_groups(groups)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def set_groups(self, groups: Sequence[int]) -> None:
        """The group count of each pass (first pass, then recursive passes); the weights are unchanged."""
        groups = tuple(groups)
        if len(groups) != self.passes:
            raise ValueError(f"expected {self.passes} group counts (one per pass), got {groups}")
        for p, g in enumerate(groups):
            check_group_count(g, self.num_tokens, f"pass {p}")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H·W, C), raster order
        for i, block in enumerate(self.blocks):
            for p in range(self.passes):
                x = block(x, self.groups[p], permute=p > 0)
                x = self.nlls[i * self.passes + p](x)
        return x.transpose(1, 2).reshape(B, C, H, W)


class SReT(LinearClassifier, nn.Module):
    """Sliced Recursive Transformer. Stage s has width base_dim·heads[s] and grid img_size/2^(3+s)."""

    global_pool = "avg"

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        base_dim: int = 32,
        heads: Sequence[int] = (2, 4, 8),
        depth: Sequence[int] = (4, 10, 6),
        recursive_num: Sequence[int] = (2, 5, 3),
        groups: Groups = ((8, 2), (4, 1), (1, 1)),
        mlp_ratio: float = 3.6,
        nll_ratio: float = 1.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        perm_seed: int = 0,
    ) -> None:
        super().__init__()
        if not len(heads) == len(depth) == len(recursive_num) == len(groups):
            raise ValueError("heads, depth, recursive_num and groups need one entry per stage")
        self.num_classes = num_classes
        self.img_size = img_size
        widths = [base_dim * h for h in heads]
        self.num_features = self.head_hidden_size = widths[-1]

        self.stem = ConvStem(in_chans, widths[0])
        grid = _conv_out(_conv_out(_conv_out(img_size)))
        self.pos_embed = nn.Parameter(torch.zeros(1, widths[0], grid, grid))
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depth)
        rates = drop_path_rates(drop_path_rate, total)
        stages = []
        for s, (dim, n_heads, d, r, g) in enumerate(zip(widths, heads, depth, recursive_num, groups, strict=True)):
            if s > 0:
                grid = _conv_out(grid)
            start = sum(depth[:s])
            stages.append(
                SReTStage(
                    dim,
                    n_heads,
                    d,
                    r,
                    g,
                    (grid, grid),
                    mlp_ratio,
                    nll_ratio,
                    in_dim=widths[s - 1] if s > 0 else None,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + d],
                    perm_seed=perm_seed + 1000 * s,  # distinct per block; fixed, so eval stays reproducible
                )
            )
        self.stages = nn.ModuleList(stages)

        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = linear_head(self.num_features, num_classes)

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_linear_weights)

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The current group count of every stage and pass."""
        return tuple(stage.groups for stage in self.stages)

    def set_groups(self, groups: Groups) -> None:
        """Set every stage's group counts, e.g. [[8, 2], [4, 1], [1, 1]]; validated before anything changes."""
        if len(groups) != len(self.stages):
            raise ValueError(f"expected group counts for {len(self.stages)} stages, got {len(groups)}")
        previous = self.groups
        try:
            for stage, g in zip(self.stages, groups, strict=True):
                stage.set_groups(g)
        except ValueError:
            for stage, g in zip(self.stages, previous, strict=True):
                stage.set_groups(g)
            raise

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C_last, H/32, W/32)."""
        x = self.stem(x)
        if x.shape[-2:] != self.pos_embed.shape[-2:]:
            raise ValueError(
                f"input gives a {tuple(x.shape[-2:])} grid but the model was built for img_size {self.img_size} "
                f"({tuple(self.pos_embed.shape[-2:])} grid)"
            )
        x = self.pos_drop(x + self.pos_embed)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def sret_checkpoint_filter(state: dict[str, Any], model: SReT) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict for `model`: taken out of a training checkpoint's `model` or `state_dict` entry and
    DDP's `module.` prefix, its position embedding (1, C, H, W) resized to the model's grid (bicubic)."""
    state = state.get("model", state)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[-2:] != model.pos_embed.shape[-2:]:
        state["pos_embed"] = F.interpolate(pos, size=model.pos_embed.shape[-2:], mode="bicubic", align_corners=False)
    return state


# The published variants; each entry only sets constructor arguments.
_VARIANTS: dict[str, dict[str, Any]] = {
    "sret_t": dict(base_dim=32, heads=(2, 4, 8), mlp_ratio=3.6, nll_ratio=1.0),
    "sret_lt": dict(base_dim=32, heads=(2, 4, 8), mlp_ratio=4.0, nll_ratio=1.0),
    "sret_s": dict(base_dim=42, heads=(3, 6, 12), mlp_ratio=3.0, nll_ratio=2.0),
}
_SHARED = dict(depth=(4, 10, 6), recursive_num=(2, 5, 3), groups=((8, 2), (4, 1), (1, 1)))


def sret_variants() -> dict[str, dict[str, Any]]:
    """The constructor arguments of every named variant."""
    return {name: {**_SHARED, **args} for name, args in _VARIANTS.items()}


register_variants(__name__, SReT, sret_variants())

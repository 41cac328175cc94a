"""Unified MSA: one attention layer that also expresses bottleneck convolutions and a skip.

Candidates, cheapest first: skip < bconv1 < bconv3 < msa. The conv candidates own no projection of
their own; they reuse v and proj. With s = softmax(z / t) over heads (z: [heads, 9], one column per
kernel tap p = 3·ky + kx), tap p of the kernel is

    W_p = Σ_h s[h, p] · W_v^h          (dh × D, W_v^h the rows of v for head h)

and the output projection mixes proj's head slices the same way. A bconv_k layer is

    conv_k(D → dh, taps W_p, bias Σ_p b_p) → BN(dh) → ReLU → linear(dh → D, Σ_p P_p, proj.bias)

over the patch-token grid, where b_p, P_p mix v's bias and proj's columns with s[:, p]; the 1×1 conv
is the centre tap (p = 4) of the 3×3. Prefix tokens (class, registers) get a zero update from every
conv or skip candidate.

Slimmed tokens, the first D' < D channels (a family's width search), keep the width per head: they use the
first D'·heads/D heads, and of every weight the rows and columns of those heads and channels (`weights`).
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Self

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from ..architecture import CONV_KERNEL_SIZE, MIXERS
from .affine_skip import AffineSkip
from .gates import BinaryGates, GateConfig

_NUM_TAPS = 9  # the 3×3 kernel; 1×1 is its centre tap
_CENTRE_TAP = 4


def mixer_index(on: torch.Tensor) -> torch.Tensor:
    """Index into MIXERS from cumulative gate states (..., 3), bool or 0/1: the length of the leading run of ons."""
    return torch.cumprod(on.to(torch.int64), -1).sum(-1)


class AttentionWeights(NamedTuple):
    """The (weight, bias) pairs one width of a unified MSA computes with, for its first `heads` heads."""

    heads: int
    qk: tuple[torch.Tensor, torch.Tensor | None]  # (2·heads·dh, D'): the q rows, then the k rows
    v: tuple[torch.Tensor, torch.Tensor | None]  # (heads·dh, D')
    proj: tuple[torch.Tensor, torch.Tensor | None]  # (D', heads·dh)


class UnifiedAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        gates: GateConfig = GateConfig(),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.head_mix_temperature = gates.head_mix_temperature

        self.qk = nn.Linear(dim, 2 * self.attn_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, self.attn_dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

        self.head_mix_logits = nn.Parameter(torch.zeros(num_heads, _NUM_TAPS))  # z
        self.bn1 = nn.BatchNorm2d(self.head_dim)
        self.bn3 = nn.BatchNorm2d(self.head_dim)
        self.act = nn.ReLU()
        self.gates = BinaryGates(len(MIXERS) - 1, gates.init, gates.temperature)  # [bconv1, bconv3, msa]
        self.skip_affine = AffineSkip(dim) if gates.skip_mixer == "affine" else None  # None: the identity skip
        self.fixed_mixer: str | None = None
        # One training forward's draw of the cumulative gates and the mixer it picks, set by the supernet for all
        # blocks at once (one host read per step); None while this layer draws for itself.
        self.drawn: tuple[torch.Tensor, str] | None = None

    @classmethod
    def converted(cls, attn: nn.Module, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig) -> Self:
        """A unified MSA shaped like `attn`, any attention with a fused qkv and a proj layer (timm's, or a family's
        variant of it): its qkv split into qk and v, its proj copied. A family copies what its variant adds."""
        unified = cls(
            attn.qkv.in_features,
            attn.num_heads,
            grid_size,
            num_prefix_tokens,
            head_dim=attn.proj.in_features // attn.num_heads,  # not every attention stores its head width
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            gates=gates,
        )
        unified.load_qkv(attn.qkv)
        unified.proj = copy.deepcopy(attn.proj)
        return unified

    @classmethod
    def from_timm(
        cls, attn: Attention, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig
    ) -> UnifiedAttention:
        """Convert timm's `Attention` with its q/k norms."""
        unified = cls.converted(attn, grid_size, num_prefix_tokens, gates)
        unified.q_norm = copy.deepcopy(attn.q_norm)
        unified.k_norm = copy.deepcopy(attn.k_norm)
        return unified

    @torch.no_grad()
    def load_qkv(self, qkv: nn.Linear) -> None:
        """Copy a fused qkv projection (D → 3·A, rows q, k, v) into qk and v."""
        a = self.attn_dim
        self.qk.weight.copy_(qkv.weight[: 2 * a])
        self.v.weight.copy_(qkv.weight[2 * a :])
        if qkv.bias is not None:
            self.qk.bias.copy_(qkv.bias[: 2 * a])
            self.v.bias.copy_(qkv.bias[2 * a :])

    def draw_gates(self) -> torch.Tensor:
        """A training draw of the cumulative gates [bconv1, bconv3, msa]: each exactly 0 or 1 in value, with the
        straight-through gradient of the relaxed sample. The number of ones picks the mixer: MIXERS[sum]."""
        return torch.cumprod(self.gates(), 0)

    def current_mixer(self) -> str:
        """The mixer chosen by the deterministic rule: the cheapest-first run of gates with logit > 0."""
        return MIXERS[int(mixer_index(self.gates.is_on()))]

    def set_skip_mixer(self, skip_mixer: str) -> None:
        """Keep the affine skip, add one at s = 1, t = 0 (on the layer's device) or drop it (identity)."""
        if skip_mixer == "identity":
            self.skip_affine = None
        elif self.skip_affine is None:
            self.skip_affine = AffineSkip(self.v.in_features).to(self.v.weight.device)

    def has_branch(self, mixer: str | None) -> bool:
        """Whether a block computes its mixer branch at all with `mixer` (None: while the gates train): not for
        the identity skip, whose update is zero."""
        return mixer != "skip" or self.skip_affine is not None

    def chosen_mixer(self) -> str | None:
        """The mixer this forward computes alone, or None while training the gates (all candidates)."""
        if self.fixed_mixer is not None:
            return self.fixed_mixer
        return None if self.training else self.current_mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D), N = prefix + grid tokens
        mixer = self.chosen_mixer()
        if mixer is None:
            return self._forward_search(x)
        if mixer == "msa":
            weights = self.weights(int(x.shape[-1]))  # int: under tracing (fvcore) a size is a tensor
            return self._attention(x, F.linear(x, *weights.v), weights)
        if mixer == "skip":
            return torch.zeros_like(x) if self.skip_affine is None else self.skip_affine(x)
        return self._forward_conv(x, CONV_KERNEL_SIZE[mixer])

    def weights(self, dim: int | None = None) -> AttentionWeights:
        """The weights `dim`-wide tokens use (default: all D channels, the layers' own parameters).

        Slimmed tokens (dim < D) use the first dim·heads/D heads: views of the first rows and columns of v and
        proj, and a copy of qk's first q rows and first k rows.
        """
        full = self.v.in_features
        if dim is None or dim == full:
            qk, v, proj = ((m.weight, m.bias) for m in (self.qk, self.v, self.proj))
            return AttentionWeights(self.num_heads, qk, v, proj)
        heads, rest = divmod(dim * self.num_heads, full)
        if rest or not 0 < dim < full:
            raise ValueError(f"{dim} of {full} channels are not a whole number of the {self.num_heads} heads")
        a = heads * self.head_dim
        qk_weight = self.qk.weight.view(2, self.attn_dim, full)[:, :a, :dim].reshape(2 * a, dim)
        qk_bias = None if self.qk.bias is None else self.qk.bias.view(2, self.attn_dim)[:, :a].reshape(2 * a)
        v_bias = None if self.v.bias is None else self.v.bias[:a]
        proj_bias = None if self.proj.bias is None else self.proj.bias[:dim]
        return AttentionWeights(
            heads, (qk_weight, qk_bias), (self.v.weight[:a, :dim], v_bias), (self.proj.weight[:dim, :a], proj_bias)
        )

    def parameters_for(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        """The parameters `mixer` uses at width `dim` (default: the full width): a conv keeps v, proj, z and its
        own BN, but not qk. Slimmed, they are the used slices of the parameters."""
        if mixer == "skip":
            return []
        weights = self.weights(dim)
        shared = [t for t in (*weights.v, *weights.proj) if t is not None]
        if mixer == "msa":
            qk = [t for t in weights.qk if t is not None]
            return [*qk, *self.q_norm.parameters(), *self.k_norm.parameters(), *shared]
        bn = self.bn1 if CONV_KERNEL_SIZE[mixer] == 1 else self.bn3
        return [*shared, self.head_mix_logits[: weights.heads], *bn.parameters()]

    def plain_state(self, mixer: str, dim: int | None = None) -> dict[str, torch.Tensor]:
        """The state dict of the plain layer that computes `mixer` (`PlainAttention` for msa, `BottleneckConv`
        for a conv) for tokens of width `dim` (default: the full width)."""
        weights = self.weights(dim)
        (proj_weight, proj_bias), (v_weight, v_bias) = weights.proj, weights.v
        state = {"proj.weight": proj_weight} | ({} if proj_bias is None else {"proj.bias": proj_bias})
        if mixer == "msa":
            qk_weight, qk_bias = weights.qk
            state["qkv.weight"] = torch.cat([qk_weight, v_weight])  # (3·A, D): q, k, v rows as timm's
            if v_bias is not None:
                state["qkv.bias"] = torch.cat([qk_bias, v_bias])
            norms = self.q_norm.state_dict(prefix="q_norm.")
            return state | norms | self.k_norm.state_dict(prefix="k_norm.")
        kernel_size = CONV_KERNEL_SIZE[mixer]
        kernel, bias, proj = self.conv_parameters(kernel_size, dim)
        state |= {"conv.weight": kernel, "proj.weight": proj}
        if bias is not None:
            state["conv.bias"] = bias
        bn = self.bn1 if kernel_size == 1 else self.bn3
        return state | bn.state_dict(prefix="bn.")

    def head_mix(self, heads: int | None = None) -> torch.Tensor:
        """s = softmax over the first `heads` heads (default: all) of z / t, per kernel tap: (heads, 9)."""
        return torch.softmax(self.head_mix_logits[:heads] / self.head_mix_temperature, dim=0)

    def conv_parameters(
        self, kernel_size: int, dim: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The bconv_k layer's conv weight (dh, D, k, k), conv bias (dh,) and projection weight (D, dh), for tokens
        of width D = `dim` (default: the full width)."""
        weights = self.weights(dim)
        s = self.head_mix(weights.heads)
        taps = s if kernel_size == 3 else s[:, _CENTRE_TAP : _CENTRE_TAP + 1]
        heads = taps.t()[:, :, None, None]  # (T, H, 1, 1)
        # Weight-only products, folded away at export: broadcast-and-sum, so FLOP counters that price
        # matmuls and convs do not count them as inference work.
        w_v = weights.v[0].view(weights.heads, self.head_dim, -1)  # (H, dh, D)
        kernel = (w_v.unsqueeze(0) * heads).sum(1)  # (T, dh, D)
        kernel = kernel.permute(1, 2, 0).reshape(self.head_dim, -1, kernel_size, kernel_size)
        bias, proj = self._mixed_bias_and_proj(taps.sum(1), weights)
        return kernel, bias, proj

    def _mixed_bias_and_proj(
        self, mix: torch.Tensor, weights: AttentionWeights
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """v's bias (dh,) and proj's columns (D, dh) mixed over heads with `mix` (H,)."""
        heads = mix.view(1, weights.heads, 1)
        v_bias = weights.v[1]
        bias = None
        if v_bias is not None:
            bias = (v_bias.view(1, weights.heads, self.head_dim) * heads).sum(1)[0]  # (dh,)
        w_proj = weights.proj[0].view(-1, weights.heads, self.head_dim)  # (D, H, dh)
        return bias, (w_proj * heads).sum(1)  # (D, dh)

    def _attention(self, x: torch.Tensor, v: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
        B, N, _ = x.shape
        heads = weights.heads
        q, k = F.linear(x, *weights.qk).reshape(B, N, 2, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, dh)
        v = v.reshape(B, N, heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, N, heads * self.head_dim)
        return self.proj_drop(F.linear(out, *weights.proj))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√dh)·v per head: (B, H, N, dh) from q, k, v (B, H, N, dh)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def _patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        gh, gw = self.grid_size
        if N != self.num_prefix_tokens + gh * gw:
            raise ValueError(f"expected {self.num_prefix_tokens} prefix + {gh}x{gw} patch tokens, got {N} tokens")
        return x[:, self.num_prefix_tokens :].reshape(B, gh, gw, D)

    def _project_conv(self, y: torch.Tensor, bn: nn.BatchNorm2d, proj: torch.Tensor) -> torch.Tensor:
        """BN → ReLU → linear(dh → D) on conv output y (B, dh, gh, gw): the patch tokens' update (B, gh·gw, D)."""
        y = self.act(bn(y)).flatten(2).transpose(1, 2)  # (B, gh·gw, dh)
        bias = None if self.proj.bias is None else self.proj.bias[: proj.shape[0]]  # slimmed: the first D channels
        return self.proj_drop(F.linear(y, proj, bias))  # (B, gh·gw, D)

    def _with_prefix(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, gh·gw, D) → (B, N, D): prefix tokens get a zero update from conv candidates."""
        return F.pad(patches, (0, 0, self.num_prefix_tokens, 0))

    def _forward_conv(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        grid = self._patch_grid(x).permute(0, 3, 1, 2)  # (B, D, gh, gw)
        kernel, bias, proj = self.conv_parameters(kernel_size, int(x.shape[-1]))
        y = F.conv2d(grid, kernel, bias, padding=kernel_size // 2)  # (B, dh, gh, gw)
        return self._with_prefix(self._project_conv(y, self.bn1 if kernel_size == 1 else self.bn3, proj))

    def _forward_search(self, x: torch.Tensor) -> torch.Tensor:
        if self.drawn is None:  # on its own, outside a supernet's forward
            c = self.draw_gates()
            chosen = MIXERS[int(c.detach().sum())]
        else:
            c, chosen = self.drawn
        coefficients = {"skip": 1 - c[0], "bconv1": c[0] - c[1], "bconv3": c[1] - c[2], "msa": c[2]}
        # Only the chosen candidate's coefficient is 1: the single path that trains. The others need only their
        # candidate's value, for the gates' straight-through gradient, so they run without autograd: their weights
        # get no gradient this step (single-path training) and their backward costs nothing.
        trains = {mixer: torch.is_grad_enabled() and mixer == chosen for mixer in coefficients}
        with torch.set_grad_enabled(any(trains[m] for m in ("bconv1", "bconv3", "msa"))):
            v = F.linear(x, self.v.weight)  # (B, N, A), bias added per candidate
        outputs: dict[str, torch.Tensor | None] = {"skip": None}  # the identity skip's update is zero
        for mixer in coefficients:
            with torch.set_grad_enabled(trains[mixer]):
                if mixer == "skip":
                    if self.skip_affine is not None:
                        outputs[mixer] = self.skip_affine(x)
                elif mixer == "msa":
                    outputs[mixer] = self._attention(x, v if self.v.bias is None else v + self.v.bias, self.weights())
                else:
                    outputs[mixer] = self._search_conv(v, CONV_KERNEL_SIZE[mixer])  # patch tokens only
        k = torch.stack(list(coefficients.values()))  # MIXERS order
        return _SinglePathSum.apply(k, *outputs.values(), self.num_prefix_tokens, MIXERS.index(chosen))

    def _search_conv(self, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """bconv_k update of the patch tokens (B, gh·gw, D) from the bias-free value projection v (B, N, A).

        Equal to `_forward_conv` with `conv_parameters(k)`, but cheaper while z trains: the heads of v are mixed
        per tap (a depthwise conv over the A = heads·dh channels, then a sum over heads) instead of building
        the (dh, D, k, k) kernel and convolving the D input channels.
        """
        B = v.shape[0]
        gh, gw = self.grid_size
        heads, dh = self.num_heads, self.head_dim
        grid = self._patch_grid(v).permute(0, 3, 1, 2)  # (B, A, gh, gw); channel h·dh + d
        s = self.head_mix()  # (H, 9)
        if kernel_size == 1:
            taps = s[:, _CENTRE_TAP : _CENTRE_TAP + 1]  # (H, 1)
            y = (grid.view(B, heads, dh, gh, gw) * taps.view(1, heads, 1, 1, 1)).sum(1)  # (B, dh, gh, gw)
        else:
            taps = s
            kernel = s.view(heads, 1, 3, 3).repeat_interleave(dh, dim=0)  # (A, 1, 3, 3): head h's taps
            y = F.conv2d(grid, kernel, padding=1, groups=heads * dh)  # (B, A, gh, gw)
            y = y.view(B, heads, dh, gh, gw).sum(1)  # (B, dh, gh, gw): Σ_p W_p·x over the 3×3 window
        bias, proj = self._mixed_bias_and_proj(taps.sum(1), self.weights())
        if bias is not None:
            y = y + bias.view(1, dh, 1, 1)
        return self._project_conv(y, self.bn1 if kernel_size == 1 else self.bn3, proj)


class _SinglePathSum(torch.autograd.Function):
    """Σ k_i·out_i over MIXERS [skip, bconv1, bconv3, msa] for coefficients k, each exactly 0 or 1 with one 1, at
    `chosen`.

    The value is the one chosen candidate's output (the identity skip's, None, is zeros), with no multiply or add
    over the activations; the backward gives each coefficient its straight-through gradient ⟨grad, out_i⟩ and the
    chosen output the incoming gradient. The conv outputs cover the patch tokens only (prefix tokens: 0).
    """

    @staticmethod
    def forward(ctx, k, skip, conv1, conv3, msa, num_prefix_tokens, chosen):  # conv: (B, gh·gw, D), others (B, N, D)
        ctx.save_for_backward(skip, conv1, conv3, msa)
        ctx.num_prefix_tokens = num_prefix_tokens
        ctx.chosen = chosen  # the index of k's one 1, known on the host: reading k would sync the device
        if chosen == 3:
            return msa.clone()
        if chosen == 0:
            return torch.zeros_like(msa) if skip is None else skip.clone()
        return F.pad((conv1, conv3)[chosen - 1], (0, 0, num_prefix_tokens, 0))

    @staticmethod
    def backward(ctx, grad):  # grad: (B, N, D)
        skip, conv1, conv3, msa = ctx.saved_tensors
        patches = grad[:, ctx.num_prefix_tokens :]
        flat = grad.reshape(-1)
        no_update = torch.zeros((), dtype=grad.dtype, device=grad.device)
        dots = [
            no_update if skip is None else torch.vdot(flat, skip.reshape(-1)),
            *(torch.vdot(patches.reshape(-1), c.reshape(-1)) for c in (conv1, conv3)),
            torch.vdot(flat, msa.reshape(-1)),
        ]
        grads: list[torch.Tensor | None] = [None, None, None, None]
        if ctx.chosen != 0 or skip is not None:
            grads[ctx.chosen] = patches if ctx.chosen in (1, 2) else grad
        return torch.stack(dots), *grads, None, None

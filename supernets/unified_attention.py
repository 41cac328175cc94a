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
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .architecture import CONV_KERNEL_SIZE, MIXERS
from .gates import BinaryGates, GateConfig

_NUM_TAPS = 9  # the 3×3 kernel; 1×1 is its centre tap
_CENTRE_TAP = 4


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
        self.fixed_mixer: str | None = None

    @classmethod
    def from_timm(
        cls, attn: Attention, grid_size: tuple[int, int], num_prefix_tokens: int, gates: GateConfig
    ) -> UnifiedAttention:
        """Convert timm's `Attention`, splitting its qkv projection into qk and v."""
        dim = attn.qkv.in_features
        unified = cls(
            dim,
            attn.num_heads,
            grid_size,
            num_prefix_tokens,
            head_dim=attn.head_dim,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            gates=gates,
        )
        a = unified.attn_dim
        with torch.no_grad():
            unified.qk.weight.copy_(attn.qkv.weight[: 2 * a])
            unified.v.weight.copy_(attn.qkv.weight[2 * a :])
            if attn.qkv.bias is not None:
                unified.qk.bias.copy_(attn.qkv.bias[: 2 * a])
                unified.v.bias.copy_(attn.qkv.bias[2 * a :])
        unified.proj = copy.deepcopy(attn.proj)
        unified.q_norm = copy.deepcopy(attn.q_norm)
        unified.k_norm = copy.deepcopy(attn.k_norm)
        return unified

    def current_mixer(self) -> str:
        """The mixer chosen by the deterministic rule: the cheapest-first run of gates with logit > 0."""
        on = self.gates.is_on().to(torch.int64)
        return MIXERS[int(torch.cumprod(on, 0).sum())]

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
            return self._attention(x, self.v(x))
        if mixer == "skip":
            return torch.zeros_like(x)
        return self._forward_conv(x, CONV_KERNEL_SIZE[mixer])

    def parameters_for(self, mixer: str) -> list[nn.Parameter]:
        """The parameters `mixer` uses: a conv keeps v, proj, z and its own BN, but not qk."""
        if mixer == "skip":
            return []
        if mixer == "msa":
            modules = [self.qk, self.q_norm, self.k_norm, self.v, self.proj]
            return [p for m in modules for p in m.parameters()]
        bn = self.bn1 if CONV_KERNEL_SIZE[mixer] == 1 else self.bn3
        return [*self.v.parameters(), *self.proj.parameters(), self.head_mix_logits, *bn.parameters()]

    def head_mix(self) -> torch.Tensor:
        """s = softmax over heads of z / t, per kernel tap: (heads, 9)."""
        return torch.softmax(self.head_mix_logits / self.head_mix_temperature, dim=0)

    def conv_parameters(self, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The bconv_k layer's conv weight (dh, D, k, k), conv bias (dh,) and projection weight (D, dh)."""
        taps = self.head_mix() if kernel_size == 3 else self.head_mix()[:, _CENTRE_TAP : _CENTRE_TAP + 1]
        heads = taps.t()[:, :, None, None]  # (T, H, 1, 1)
        # Weight-only products, folded away at export: broadcast-and-sum, so FLOP counters that price
        # matmuls and convs do not count them as inference work.
        w_v = self.v.weight.view(self.num_heads, self.head_dim, -1)  # (H, dh, D)
        kernel = (w_v.unsqueeze(0) * heads).sum(1)  # (T, dh, D)
        kernel = kernel.permute(1, 2, 0).reshape(self.head_dim, -1, kernel_size, kernel_size)
        bias, proj = self._mixed_bias_and_proj(taps)
        return kernel, None if bias is None else bias.sum(0), proj.sum(0)

    def _mixed_bias_and_proj(self, taps: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-tap mixed v bias (T, dh) and proj weight (T, D, dh) for mixing weights `taps` (H, T)."""
        heads = taps.t()[:, :, None]  # (T, H, 1)
        bias = None
        if self.v.bias is not None:
            bias = (self.v.bias.view(1, self.num_heads, self.head_dim) * heads).sum(1)  # (T, dh)
        w_proj = self.proj.weight.view(-1, self.num_heads, self.head_dim)  # (D, H, dh)
        proj = (w_proj.unsqueeze(0) * heads.unsqueeze(1)).sum(2)  # (T, D, dh)
        return bias, proj

    def _attention(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, dh)
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(out))

    def _patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        gh, gw = self.grid_size
        if N != self.num_prefix_tokens + gh * gw:
            raise ValueError(f"expected {self.num_prefix_tokens} prefix + {gh}x{gw} patch tokens, got {N} tokens")
        return x[:, self.num_prefix_tokens :].reshape(B, gh, gw, D)

    def _project_conv(self, y: torch.Tensor, bn: nn.BatchNorm2d, proj: torch.Tensor) -> torch.Tensor:
        """BN → ReLU → linear(dh → D) on conv output y (B, dh, gh, gw); prefix tokens get zeros."""
        y = self.act(bn(y)).flatten(2).transpose(1, 2)  # (B, gh·gw, dh)
        y = self.proj_drop(F.linear(y, proj, self.proj.bias))  # (B, gh·gw, D)
        return F.pad(y, (0, 0, self.num_prefix_tokens, 0))  # (B, N, D)

    def _forward_conv(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        grid = self._patch_grid(x).permute(0, 3, 1, 2)  # (B, D, gh, gw)
        kernel, bias, proj = self.conv_parameters(kernel_size)
        y = F.conv2d(grid, kernel, bias, padding=kernel_size // 2)  # (B, dh, gh, gw)
        return self._project_conv(y, self.bn1 if kernel_size == 1 else self.bn3, proj)

    def _forward_search(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.cumprod(self.gates(), 0)  # cumulative [bconv1, bconv3, msa], each 0 or 1 in value
        v = F.linear(x, self.v.weight)  # (B, N, A), bias added per candidate
        msa = self._attention(x, v if self.v.bias is None else v + self.v.bias)
        conv1, conv3 = self._conv_candidates(v)
        # Only the most expensive active candidate has a coefficient of 1; all off leaves zeros (skip).
        return c[2] * msa + (c[1] - c[2]) * conv3 + (c[0] - c[1]) * conv1

    def _conv_candidates(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bconv1 and bconv3 outputs (B, N, D) from the bias-free value projection v (B, N, A)."""
        B = v.shape[0]
        gh, gw = self.grid_size
        s = self.head_mix()
        v_heads = self._patch_grid(v).reshape(B, gh, gw, self.num_heads, self.head_dim)
        taps = torch.einsum("byxhd,hp->byxpd", v_heads, s)  # (B, gh, gw, 9, dh): W_p·x at each token
        bias, proj = self._mixed_bias_and_proj(s)

        conv1 = taps[:, :, :, _CENTRE_TAP]  # (B, gh, gw, dh)
        # A 3×3 conv with zero padding: output (y, x) sums tap (ky, kx) of the token at (y+ky-1, x+kx-1).
        padded = F.pad(taps, (0, 0, 0, 0, 1, 1, 1, 1))  # (B, gh+2, gw+2, 9, dh)
        conv3 = sum(padded[:, ky : ky + gh, kx : kx + gw, 3 * ky + kx] for ky in range(3) for kx in range(3))
        if bias is not None:
            conv1 = conv1 + bias[_CENTRE_TAP]
            conv3 = conv3 + bias.sum(0)
        out1 = self._project_conv(conv1.permute(0, 3, 1, 2), self.bn1, proj[_CENTRE_TAP])
        out3 = self._project_conv(conv3.permute(0, 3, 1, 2), self.bn3, proj.sum(0))
        return out1, out3

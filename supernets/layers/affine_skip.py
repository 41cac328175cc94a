"""RIFormer's affine skip for a block whose mixer is searched away, and its fold into the block's norm.

With `--skip-mixer affine` a unified MSA's skip candidate is no longer zero but `(s − 1)⊙N(x) + t` on its
normalised input N(x) = γ⊙x̂ + β, with learnt per-channel s (init 1) and t (init 0): the block's mixer branch
becomes an affine map of the normalised tokens instead of the identity (RIFormer, CVPR 2023). At init it is
exactly the identity skip. At export it folds into one norm: the branch is N'(x) with

    γ' = γ⊙(s − 1)⊙ℓ,   β' = (β⊙(s − 1) + t)⊙ℓ

for a layer scale ℓ after the mixer (1 without one), so a skip block costs one norm and no mixer.
"""

from __future__ import annotations

import torch
from torch import nn


class AffineSkip(nn.Module):
    """(s − 1)⊙x + t over the last dimension: the affine skip's update of normalised tokens x (..., D').

    Slimmed tokens (D' < D, a family's width search) use the first D' channels of s and t.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))  # s
        self.shift = nn.Parameter(torch.zeros(dim))  # t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return x * (self.scale[:d] - 1) + self.shift[:d]


@torch.no_grad()
def folded_norm_state(
    norm: nn.Module, affine: AffineSkip, layer_scale: torch.Tensor | None = None, dim: int | None = None
) -> dict[str, torch.Tensor]:
    """The state (`weight`, `bias`) of the norm N' that computes an affine-skip branch on its own: `norm`'s γ and β
    with `affine`'s s and t and the per-channel `layer_scale` ℓ (default: none) folded in, for the first `dim`
    channels (default: all)."""
    gamma = norm.weight[:dim]
    beta = norm.bias[:dim] if norm.bias is not None else torch.zeros_like(gamma)
    scale, shift = affine.scale[:dim] - 1, affine.shift[:dim]
    ell = layer_scale[:dim] if layer_scale is not None else torch.ones_like(gamma)
    return {"weight": gamma * scale * ell, "bias": (beta * scale + shift) * ell}

"""The SReT supernet: unified MSA and gated MLPs in SReT's recursively shared blocks, plus searchable group splits.

Per distinct block (each of a stage's `recursive_num` blocks, in stage order; `Architecture.blocks` has one entry
for each), as for ViT: the token mixer (skip < bconv1 < bconv3 < msa) and the kept MLP hidden units, both gated.
A block runs on every pass of its stage with the same weights, so one choice serves all its passes: the search
space and the exported model keep SReT's weight sharing. The NLLs after every application, the stem, the
downsampling convs and the head stay dense (not gated); they are fixed costs.

SReT has no class token: every token lies on its stage's conv grid (28², 14², 7² at 224), so the conv candidates
update every token (num_prefix_tokens = 0) and the grid changes from stage to stage. The msa candidate is SReT's
sliced group attention with the pass's group count, its tokens permuted on the recursive passes exactly as the
dense model does (a fixed permutation per layer in eval mode); the conv and skip candidates ignore the groups. A
block's learnable residual scalars (LRC) stay: x ← a·x + b·branch, so a skipped mixer leaves x ← a·x.

Group splits are discrete dimensions without gates (the Optuna search chooses them): `Architecture.groups` holds
[G_pass1, G_pass2] per stage, each any divisor of the stage's token count (`discrete_choices`); every split shares
all weights. With no architecture fixed, the supernet runs the model's configured groups, which is what the
gradient search trains and prices.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...architecture import Architecture, BlockChoice
from ...base import Supernet, check_input_size
from ...checkpoints import prefixed
from ...layers.affine_skip import folded_norm_state
from ...layers.gates import GateConfig
from ...layers.unified_attention import AttentionWeights, UnifiedAttention
from ...layers.unified_mlp import UnifiedMlp
from .sret import SlicedAttention, SReT, SReTBlock, SReTStage, check_group_count, token_permutation

__all__ = [
    "SReTStemAndHead",
    "SReTSuperBlock",
    "SReTSupernet",
    "SlicedUnifiedAttention",
    "StageLayers",
    "group_choices",
]

Groups = tuple[tuple[int, ...], ...]


def group_choices(stages: Sequence[Any]) -> dict[str, list[list[list[int]]]]:
    """The group counts an SReT offers, as `Architecture.validate_for` takes them: for every stage (anything with
    `passes` and `num_tokens`) and pass, each divisor of the stage's token count."""
    offered = []
    for stage in stages:
        n = stage.num_tokens
        offered.append([[g for g in range(1, n + 1) if n % g == 0] for _ in range(stage.passes)])
    return {"groups": offered}


class SlicedUnifiedAttention(UnifiedAttention):
    """Unified MSA whose msa candidate is SReT's sliced group attention (`SlicedAttention`): the tokens, permuted on
    a recursive pass, are cut into G contiguous chunks that attend within themselves. The conv candidates are
    UnifiedAttention's, on the stage's whole grid, and ignore the groups."""

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], perm_seed: int = 0, **kwargs: Any):
        super().__init__(dim, num_heads, grid_size, num_prefix_tokens=0, **kwargs)
        self.perm_seed = perm_seed
        self._eval_perms: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slicing = (1, False)  # (groups, permute) of the forward running now, read by the msa candidate

    @classmethod
    def from_sret(cls, attn: SlicedAttention, grid_size: tuple[int, int], gates: GateConfig) -> SlicedUnifiedAttention:
        """Convert SReT's `SlicedAttention`, splitting its qkv projection into qk and v; the permutation seed
        stays, so eval mode permutes as the dense model does."""
        unified = cls(
            attn.qkv.in_features,
            attn.num_heads,
            grid_size,
            perm_seed=attn.perm_seed,
            qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None,
            attn_drop=attn.attn_drop,
            proj_drop=attn.proj_drop.p,
            gates=gates,
        )
        unified.load_qkv(attn.qkv)
        unified.proj = copy.deepcopy(attn.proj)
        return unified

    def permutation(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A permutation of the tokens and its inverse: fresh in training, fixed per token count in eval."""
        return token_permutation(num_tokens, device, self.training, self.perm_seed, self._eval_perms)

    def forward(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:  # x: (B, N, D)
        check_group_count(groups, int(x.shape[1]), "attention")
        self._slicing = (groups, permute)
        try:
            return super().forward(x)
        finally:
            self._slicing = (1, False)

    def _attention(self, x: torch.Tensor, v: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
        """Attention within G chunks of x (B, N, D) and its values v (B, N, A): (B, N, D). Every other step is per
        token, so the chunks simply become batch entries, as in `SlicedAttention`."""
        groups, permute = self._slicing
        B, N, _ = x.shape
        # Attention is permutation-equivariant, so shuffling only matters when it changes the chunks.
        perm = self.permutation(N, x.device) if permute and groups > 1 else None
        if perm is not None:
            x, v = x[:, perm[0]], v[:, perm[0]]
        x, v = x.reshape(B * groups, N // groups, -1), v.reshape(B * groups, N // groups, -1)  # (B·G, N/G, ·)
        out = super()._attention(x, v, weights).reshape(B, N, -1)  # (B·G, N/G, D) -> (B, N, D)
        return out if perm is None else out[:, perm[1]]


class SReTSuperBlock(nn.Module):
    """SReT's block with a unified MSA and a gated MLP: x ← a1·x + b1·mixer(LN x), then x ← a2·x + b2·MLP(LN x),
    with its learnable residual scalars and stochastic depth. Takes the groups and permutation of each pass."""

    def __init__(self, block: SReTBlock, grid_size: tuple[int, int], gates: GateConfig) -> None:
        super().__init__()
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = SlicedUnifiedAttention.from_sret(block.attn, grid_size, gates)
        self.residual1 = copy.deepcopy(block.residual1)
        self.norm2 = copy.deepcopy(block.norm2)
        self.mlp = UnifiedMlp.from_timm(block.mlp, gates)
        self.residual2 = copy.deepcopy(block.residual2)
        self.drop_path = copy.deepcopy(block.drop_path)

    def mixer_branch(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:
        return self.attn(self.norm1(x), groups, permute)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, groups: int = 1, permute: bool = False) -> torch.Tensor:  # x: (B, N, D)
        if not self.attn.has_branch(self.attn.chosen_mixer()):  # no branch, so neither its norm nor b1 does any work
            x = self.residual1.alpha * x
        else:
            x = self.residual1(x, self.drop_path(self.mixer_branch(x, groups, permute)))
        return self.residual2(x, self.drop_path(self.mlp_branch(x)))

    def subnet_state(self, choice: BlockChoice, dim: int | None = None) -> dict[str, torch.Tensor]:
        """The learnable residual scalars where ViT's block has layer scales; an identity skip block keeps only the
        first residual's scale a (x ← a·x), an affine one its folded norm as well (b stays a scalar of its own)."""
        if choice.mixer == "skip" and self.attn.skip_affine is not None:
            state = prefixed("norm1.", folded_norm_state(self.norm1, self.attn.skip_affine))
            state |= self.residual1.state_dict(prefix="residual1.")
        elif choice.mixer == "skip":
            state = {"residual1.alpha": self.residual1.alpha}
        else:
            state = self.norm1.state_dict(prefix="norm1.")
            state |= self.residual1.state_dict(prefix="residual1.")
            state |= prefixed("mixer.", self.attn.plain_state(choice.mixer))
        state |= self.norm2.state_dict(prefix="norm2.")
        state |= self.residual2.state_dict(prefix="residual2.")
        return state | prefixed("mlp.", self.mlp.pruned_state(choice.mlp_kept))

    def mixer_parameters(self, mixer: str, dim: int | None = None) -> list[torch.Tensor]:
        """The parameters a subnet needs for `mixer` in this block's mixer branch; a skipped mixer keeps the
        residual's scale a1 (an affine skip its norm and both scalars). SReT has no width choice: `dim` can only be
        the full width."""
        if mixer == "skip" and self.attn.skip_affine is not None:
            return [*self.norm1.parameters(), *self.residual1.parameters()]
        if mixer == "skip":
            return [self.residual1.alpha]
        return [*self.norm1.parameters(), *self.residual1.parameters(), *self.attn.parameters_for(mixer, dim)]

    def mlp_parameter_counts(self, dim: int | None = None) -> tuple[int, int]:
        """(parameters of the MLP branch that every number of kept units needs, parameters per kept hidden unit)."""
        mlp = self.mlp
        dim = mlp.fc1.in_features  # SReT has no width choice
        fixed = [*self.norm2.parameters(), *self.residual2.parameters()]  # and fc2's bias
        fixed_count = sum(p.numel() for p in fixed) + (0 if mlp.fc2.bias is None else dim)
        per_unit = dim + (mlp.fc1.bias is not None) + dim  # a row of fc1, its bias, a column of fc2
        return fixed_count, per_unit


class StageLayers(nn.Module):
    """What an SReT stage holds besides its blocks: the downsampling conv (identity in the first stage) and the NLL
    after each block application, with the stage's layout. Its blocks, `blocks_range` of the model's, are the
    model's own, so that every block is one entry of `blocks` and its cost is its own in FLOP counts."""

    def __init__(self, stage: SReTStage, first_block: int) -> None:
        super().__init__()
        self.downsample = copy.deepcopy(stage.downsample)
        self.nlls = copy.deepcopy(stage.nlls)  # block i's pass p is followed by nlls[i·passes + p]
        self.grid_size = stage.grid_size
        self.passes = stage.passes
        self.blocks_range = range(first_block, first_block + len(stage.blocks))

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class SReTStemAndHead(nn.Module):
    """`SReT` around `self.blocks`, its distinct blocks in stage order: stem, position embedding, the stages'
    downsampling convs and NLLs, final norm and head, copied from an SReT. The supernet and the subnets exported
    from it share this code, so that both compute exactly what SReT computes outside the blocks.

    `stage_groups()` gives the group counts the forward runs: the model's (`groups`) unless a family says else.
    """

    blocks: nn.ModuleList
    groups: Groups

    def adopt_stem_and_head(self, sret: SReT, name: str) -> None:
        """Copy every module and parameter of `sret` outside its blocks, its layout and its group counts."""
        self.name = name
        self.img_size = sret.img_size
        self.num_classes = sret.num_classes
        self.in_chans = sret.stem.layers[0].in_channels
        self.num_features = sret.num_features
        self.num_prefix_tokens = 0  # no class token: every token lies on the grid
        for module in ("stem", "pos_drop", "norm", "head_drop", "head"):
            setattr(self, module, copy.deepcopy(getattr(sret, module)))
        self.pos_embed = copy.deepcopy(sret.pos_embed)  # (1, C0, H/8, W/8)
        first = [sum(len(s.blocks) for s in sret.stages[:i]) for i in range(len(sret.stages))]
        self.stages = nn.ModuleList(StageLayers(stage, f) for stage, f in zip(sret.stages, first, strict=True))
        self.block_stages = [s for s, stage in enumerate(self.stages) for _ in stage.blocks_range]  # per block
        self.groups = sret.groups

    def stage_groups(self) -> Groups:
        return self.groups

    def discrete_choices(self) -> dict[str, list[list[list[int]]]]:
        """The group counts of every stage and pass: any divisor of the stage's token count."""
        return group_choices(self.stages)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C_last, H/32, W/32)."""
        check_input_size(x, self.name, self.img_size)
        x = self.pos_drop(self.stem(x) + self.pos_embed)  # (B, C0, H/8, W/8)
        for stage, groups in zip(self.stages, self.stage_groups(), strict=True):
            x = stage.downsample(x)
            B, C, H, W = x.shape
            x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H·W, C), raster order
            for i, index in enumerate(stage.blocks_range):
                for p, g in enumerate(groups):
                    x = self.blocks[index](x, g, permute=p > 0)
                    x = stage.nlls[i * stage.passes + p](x)
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SReTSupernet(SReTStemAndHead, Supernet):
    """Our `SReT` converted by copying its weights: its blocks as `SReTSuperBlock`s, one per distinct block, and
    the group counts of a fixed architecture, or the model's."""

    def adopt(self, model: SReT, name: str, gates: GateConfig) -> None:
        self.adopt_stem_and_head(model, name)
        blocks = [SReTSuperBlock(b, stage.grid_size, gates) for stage in model.stages for b in stage.blocks]
        self.blocks = nn.ModuleList(blocks)  # called pass by pass, never in sequence

    def stage_groups(self) -> Groups:
        """The group counts the forward runs: the fixed architecture's, else the model's."""
        return self.groups if self._fixed is None else self._fixed.groups

    def block_passes(self, index: int) -> list[dict[str, Any]]:
        """The keyword arguments of each application of block `index` in a forward, at the current groups."""
        groups = self.stage_groups()[self.block_stages[index]]
        return [{"groups": g, "permute": p > 0} for p, g in enumerate(groups)]

    # -- the architecture -------------------------------------------------------------------------

    def dense_architecture(self) -> Architecture:
        """Every block msa and every hidden unit kept, at the model's group counts."""
        return super().dense_architecture().with_extras(groups=self.groups)

    def architecture(self) -> Architecture:
        """The deterministic choice of the current gates (logit > 0), at the model's group counts."""
        return super().architecture().with_extras(groups=self.groups)

    def validate_choices(self, arch: Architecture) -> None:
        arch.validate_for(
            model=self.name,
            img_size=self.img_size,
            num_classes=self.num_classes,
            mlp_hidden=self.mlp_hidden,
            choices=self.discrete_choices(),
        )

"""RIFormer's module imitation (CVPR 2023) for the blocks a search pruned: the student's blocks learn to do what the
teacher's blocks do at the same depth.

The teacher is the dense model the student was pruned from, as our own modules: its blocks align one to one with
the student's, and both kinds of block compute `mixer_branch(x, **pass)` (norm, mixer and layer scale; zero for an
identity skip). Per block i, with x_i the student's block input (as each block is applied; a recursive family
applies a block once per pass):

- L_out: MSE(student.mixer_branch(x_i), teacher.mixer_branch(x_i)) over the blocks whose mixer was pruned (skip
  or a conv): the teacher's attention on the student's own input, what the pruned mixer should have computed;
- L_in: MSE between the student's and the teacher's block outputs, each in its own forward, over every block;
- L_rel: MSE between the token relations softmax(Z·Zᵀ/√D) of the student's and the teacher's last block outputs.

The features come from forward hooks on the blocks; no timm code is patched. The weights λ follow RIFormer's
(1e-4, 1e-3 and 1 times the batch size, as its losses are summed over the batch and ours are means).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ImitationWeights:
    """λ_out, λ_in and λ_rel per sample of the batch: each loss is weighted by λ times the batch size."""

    out: float = 1e-4
    block: float = 1e-3
    relation: float = 1.0

    def __post_init__(self) -> None:
        if min(self.out, self.block, self.relation) < 0:
            raise ValueError(f"imitation weights must not be negative, got {self}")


def token_relation(z: torch.Tensor) -> torch.Tensor:
    """softmax(Z·Zᵀ/√D) of tokens z (B, N, D): (B, N, N)."""
    z = z.float()
    return torch.softmax(z @ z.transpose(-2, -1) / z.shape[-1] ** 0.5, dim=-1)


class ModuleImitation:
    """The imitation losses of one training step, from hooks on `student_blocks` and `teacher_blocks` (the teacher's
    first ones, as many as the student has). `pruned(i)` says whether the student's block i has its mixer pruned in
    the forward under way (fixed for a subnet; drawn anew each step in a search). L_out is computed as each student
    block runs, while the choices of its forward hold. Only the student's training forwards count, and the
    teacher's forwards that follow one."""

    def __init__(
        self,
        student_blocks: Sequence[nn.Module],
        teacher_blocks: Sequence[nn.Module],
        pruned: Callable[[int], bool],
        weights: ImitationWeights = ImitationWeights(),
    ) -> None:
        if len(teacher_blocks) < len(student_blocks):
            raise ValueError(
                f"imitation needs a teacher with the student's blocks: the teacher has {len(teacher_blocks)}, the "
                f"student {len(student_blocks)}"
            )
        self.student_blocks, self.teacher_blocks = list(student_blocks), list(teacher_blocks)[: len(student_blocks)]
        self.pruned = pruned
        self.weights = weights
        self._out_terms: list[torch.Tensor] = []
        self._outputs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self._hooks = [
            *(
                b.register_forward_hook(self._student_block(i), with_kwargs=True)
                for i, b in enumerate(self.student_blocks)
            ),
            *(b.register_forward_hook(self._teacher_block) for b in self.teacher_blocks),
        ]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _student_block(self, i: int) -> Callable[..., None]:
        def record(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
            if not block.training:  # an evaluation's forward
                return
            self._outputs["student"].append(output)
            if self.pruned(i):
                x, rest = args[0], args[1:]  # a recursive family's pass arguments (groups, permutation) follow x
                with torch.no_grad():
                    target = self.teacher_blocks[i].mixer_branch(x.detach(), *rest, **kwargs)
                self._out_terms.append(F.mse_loss(block.mixer_branch(x, *rest, **kwargs).float(), target.float()))

        return record

    def _teacher_block(self, _block: nn.Module, _args: Any, output: torch.Tensor) -> None:
        # The teacher is always in eval mode: its forwards count only after a student's training forward.
        if len(self._outputs["teacher"]) < len(self._outputs["student"]):
            self._outputs["teacher"].append(output)

    def losses(self) -> dict[str, torch.Tensor]:
        """The weighted sum (`imitation`) and each unweighted term (`imitation_out`, `_block`, `_relation`), from the
        student's and the teacher's forwards on the same batch since the last call."""
        student, teacher, out_terms = self._outputs["student"], self._outputs["teacher"], self._out_terms
        self._outputs, self._out_terms = {"student": [], "teacher": []}, []
        if not student or len(student) != len(teacher):
            raise RuntimeError("imitation needs one student and one teacher forward on the same batch")
        batch = student[0].shape[0]
        out = torch.stack(out_terms).mean() if out_terms else student[0].new_zeros((), dtype=torch.float32)
        block = torch.stack([F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher, strict=True)])
        relation = F.mse_loss(token_relation(_tokens(student[-1])), token_relation(_tokens(teacher[-1].detach())))
        w = self.weights
        total = batch * (w.out * out + w.block * block.mean() + w.relation * relation)
        return {
            "imitation": total,
            "imitation_out": out.detach(),
            "imitation_block": block.mean().detach(),
            "imitation_relation": relation.detach(),
        }


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens of a block output, a grid (B, H, W, D) flattened."""
    return x.flatten(1, -2)

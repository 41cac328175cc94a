"""Distillation losses: soft-label KD (as RIFormer and recursive ViTs train), DeiT-style hard distillation, or none.

The total is `(1 - alpha) · CE(student, labels) + alpha · KD(student, teacher)`; `none` is the plain CE.
Soft KD is KL(softmax(t/τ) ‖ softmax(s/τ)) · τ², averaged over the batch, so its gradient keeps the scale
of the CE's as τ changes (Hinton et al.). Hard KD is the CE against the teacher's argmax; SPViT fine-tunes
this way without a distillation token, so the student's one head answers both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTILLATION_TYPES = ("soft", "hard", "none")


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(teacher ‖ student) of the temperature-τ distributions, summed over classes, mean over the batch."""
    student = F.log_softmax(student_logits.float() / tau, dim=-1)  # (B, classes)
    teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * tau * tau


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 class."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


class DistillationLoss(nn.Module):
    def __init__(self, kind: str = "soft", alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in DISTILLATION_TYPES:
            raise ValueError(f"distillation type '{kind}' is not one of {', '.join(DISTILLATION_TYPES)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha {alpha} is not in [0, 1]")
        if tau <= 0:
            raise ValueError(f"distillation temperature {tau} is not positive")
        self.kind = kind
        self.alpha = alpha if kind != "none" else 0.0
        self.tau = tau
        self.label_smoothing = label_smoothing

    def forward(
        self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its parts (`ce`, and `kd` unless the type is none), detached, for logging."""
        ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.kind == "none":
            return ce, {"ce": ce.detach()}
        if teacher_logits is None:
            raise ValueError(f"'{self.kind}' distillation needs the teacher's logits")
        if self.kind == "soft":
            kd = soft_distillation(student_logits, teacher_logits, self.tau)
        else:
            kd = hard_distillation(student_logits, teacher_logits)
        return (1 - self.alpha) * ce + self.alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}

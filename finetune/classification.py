"""Image classification as an engine `Task`: cross-entropy training, top-1/top-5 evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .devices import accumulation_dtype, to_device
from .distillation import DistillationLoss
from .distributed import DistributedContext
from .engine import Engine, EngineConfig, Task
from .optim import adamw, weight_decay_groups
from .schedule import warmup_cosine


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy over `loader`, computed on the model's device; the sums
    stay there until the end, so the loop never waits for the device."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=accumulation_dtype(device), device=device)
    count = 0
    for images, targets in loader:
        images, targets = to_device((images, targets), device)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        sums += torch.stack([
            F.cross_entropy(logits.float(), targets, reduction="sum"),
            (top[:, 0] == targets).sum(),
            (top == targets[:, None]).any(dim=1).sum(),
        ]).to(sums.dtype)  # fmt: skip
        count += len(targets)
    loss, correct1, correct5 = sums.tolist()
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "loss": loss / count}


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A batch's top-1 accuracy (%), a device tensor (a training step's metric, not read on the host)."""
    return 100 * (logits.argmax(1) == targets).float().mean()


class ClassificationTask(Task):
    """Cross-entropy against the labels, distilled from a frozen teacher's logits when `loss` asks for it;
    validation top-1/top-5."""

    def __init__(
        self, val_loader: DataLoader, loss: DistillationLoss | None = None, teacher: nn.Module | None = None
    ) -> None:
        self.val_loader = val_loader
        self.loss = loss if loss is not None else DistillationLoss("none")
        if self.loss.kind != "none" and teacher is None:
            raise ValueError(f"'{self.loss.kind}' distillation needs a teacher")
        self.teacher = teacher

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        images, targets = batch
        logits = model(images)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        loss, parts = self.loss(logits, targets, teacher_logits)
        return loss, {**parts, "acc1": top1_accuracy(logits, targets)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_classifier(model, self.val_loader)


def train_classifier(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    out_dir: str | Path,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: int = 1,
    label_smoothing: float = 0.1,
    context: DistributedContext | None = None,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),  # noqa: B008 (a device is immutable)
    amp: str = "none",
) -> dict[str, float]:
    """Train `model` from scratch or from its weights with AdamW and warmup-cosine, on `device`; returns val
    metrics."""
    model.to(device)
    optimizer = adamw(weight_decay_groups(model, weight_decay), lr=lr)
    steps = epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, steps, warmup_epochs * len(train_loader))
    engine = Engine(
        model,
        ClassificationTask(val_loader, DistillationLoss("none", label_smoothing=label_smoothing)),
        {"weights": optimizer},
        {"weights": scheduler},
        train_loader,
        EngineConfig(Path(out_dir), epochs, grad_clip=5.0, progress=progress, device=device, amp=amp),
        context,
    )
    return engine.fit()

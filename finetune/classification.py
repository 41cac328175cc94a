"""Image classification as an engine `Task`: cross-entropy training, top-1/top-5 evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .distributed import DistributedContext
from .engine import Engine, EngineConfig
from .optim import weight_decay_groups
from .schedule import warmup_cosine


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy over `loader`."""
    correct1 = correct5 = loss = count = 0.0
    for images, targets in loader:
        logits = model(images)
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=1).sum().item()
        count += len(targets)
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "loss": loss / count}


class ClassificationTask:
    """Cross-entropy with optional label smoothing; validation top-1/top-5."""

    def __init__(self, val_loader: DataLoader, label_smoothing: float = 0.0) -> None:
        self.val_loader = val_loader
        self.label_smoothing = label_smoothing

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        logits = model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return loss, {"acc1": 100 * (logits.argmax(1) == targets).float().mean().item()}

    def after_step(self, metrics: dict[str, float]) -> None:
        pass

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_classifier(model, self.val_loader)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
) -> dict[str, float]:
    """Train `model` from scratch or from its weights with AdamW and warmup-cosine; returns val metrics."""
    optimizer = torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr)
    steps = epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, steps, warmup_epochs * len(train_loader))
    engine = Engine(
        model,
        ClassificationTask(val_loader, label_smoothing),
        {"weights": optimizer},
        {"weights": scheduler},
        train_loader,
        EngineConfig(Path(out_dir), epochs, grad_clip=5.0, progress=progress),
        context,
    )
    return engine.fit()

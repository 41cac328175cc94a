"""`spvit eval`: accuracy, cost and latency of one model, a saved subnet or any timm/supernet model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.classification import evaluate_classifier
from lookup_tables.counting import count_macs
from lookup_tables.latency import Timer
from supernets.devices import device_name


def describe_model(
    model: nn.Module, val_loader: DataLoader, img_size: int, latency_batch: int, compiled: bool = False
) -> dict[str, Any]:
    """Top-1/top-5 on `val_loader`, MACs per image (`fvcore` convention), parameters, and latency on the model's
    device, with what the latency was measured on (device, batch, dtype, CPU threads). `compiled`: the accuracy and
    latency forwards run `torch.compile(model)` (its first call compiles, so the latency warm-up absorbs it)."""
    model.eval()
    parameter = next(model.parameters())
    device = parameter.device
    forward = torch.compile(model) if compiled else model
    metrics = evaluate_classifier(forward, val_loader)
    image = torch.zeros(1, 3, img_size, img_size)
    images = torch.randn(latency_batch, 3, img_size, img_size, device=device)
    latency_ms, _ = Timer(device, repeats=10)({("network",): lambda: forward(images)})[("network",)]
    return {
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
        "macs": count_macs(model, image),
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms": latency_ms,
        "latency_batch": latency_batch,
        "device": device_name(device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "compiled": compiled,
    }


def format_description(name: str, d: dict[str, Any]) -> str:
    return (
        f"{name}: top-1 {d['acc1']:.2f}%, top-5 {d['acc5']:.2f}%, {d['macs'] / 1e6:.2f} MMACs, "
        f"{d['params'] / 1e6:.3f} M params, {d['latency_ms']:.2f} ms per batch of {d['latency_batch']} "
        f"(median; {d['device']}, {d['dtype']}, {d['threads']} threads{', compiled' if d.get('compiled') else ''})"
    )

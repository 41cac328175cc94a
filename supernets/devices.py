"""Timing work on a device: waiting for it, and naming it for the figures measured on it."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for every kernel queued on `device`, so that a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """A human name of `device`, for the figures measured on it: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"CPU ({model})" if model else "CPU"

"""Where a run computes and in which precision: `--device` and `--amp`, resolved once and checked before any work.

`auto` picks CUDA, then MPS, then the CPU. Under `torchrun` a bare `cuda` means this process's GPU,
`cuda:LOCAL_RANK`. Mixed precision is `none`, `bf16` or `fp16`; its default (`auto`) is bf16 on a CUDA GPU that
supports it and none elsewhere: bf16 on the CPU works but is slower than float32 on most CPUs.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
AMP_MODES = ("auto", "none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def available_devices() -> list[str]:
    """The devices this machine can compute on, as `--device` values."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` of a `--device` value, refused with a `ValueError` naming the available devices when this
    machine does not have it."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    match = _DEVICE.match(spec)
    if match is None:
        raise ValueError(f"--device '{spec}' is not one of {', '.join(DEVICES)}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if index is not None:
            raise ValueError(f"--device '{spec}': auto takes no index")
        kind = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    available = ", ".join(available_devices())
    if kind == "mps":
        if not _mps_available():
            raise ValueError(f"--device mps: this machine has no MPS device (available: {available})")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this machine has no CUDA device (available: {available})")
    if index is None:  # under torchrun every process takes its own GPU
        index = os.environ.get("LOCAL_RANK", str(torch.cuda.current_device()))
    if int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device cuda:{index}: this machine has {torch.cuda.device_count()} GPU(s) (available: "
                         f"{available})")  # fmt: skip
    return torch.device("cuda", int(index))


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """`none`, `bf16` or `fp16` for an `--amp` value on `device`; `auto` is bf16 on a CUDA GPU that supports it."""
    amp = (amp or "auto").lower()
    if amp not in AMP_MODES:
        raise ValueError(f"--amp '{amp}' is not one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return amp


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast context of a training forward: `amp`'s dtype on `device`, or nothing for `none`."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[amp])


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype metric sums are kept in on `device`: float64 (exact counts), float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def pin_memory(device: torch.device) -> bool:
    """Whether loaders should pin host memory: only for CUDA, whose copies from pinned memory run asynchronously."""
    return device.type == "cuda"


def to_device(batch: object, device: torch.device) -> object:
    """`batch` (a tensor, or a tuple/list/dict of them) on `device`; copies from pinned memory do not block."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch

"""Checkpoints as one safetensors file: the tensors, plus a JSON document of everything else.

Optimizer, scheduler and RNG states are nested Python data with tensors inside. `flatten_state` moves
every tensor into the safetensors dict and leaves a `{"__tensor__": key}` reference in the JSON, so a
checkpoint is loaded without unpickling anything, and one atomic write covers it all.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from supernets.io import atomic_write_bytes

STATE_KEY = "spvit_state"
_TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-ready copy of `obj` with tensors moved into `tensors` under keys starting with `prefix`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {_TENSOR_REF: key}
    if isinstance(obj, np.ndarray):
        return flatten_state(torch.from_numpy(obj.copy()), tensors, prefix)
    if isinstance(obj, dict):
        # Keys stay typed (optimizer states are keyed by int): a dict is stored as its list of pairs.
        pairs = [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)] for k, v in obj.items()]
        return {"__dict__": pairs}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR_REF in obj:
            return tensors[obj[_TENSOR_REF]]
        if _TUPLE in obj:
            return tuple(unflatten_state(v, tensors) for v in obj[_TUPLE])
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the model's tensors and the nested `state` atomically into one safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
    document = flatten_state(state, tensors, "state")
    atomic_write_bytes(path, save(tensors, metadata={STATE_KEY: json.dumps(document)}))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, nested state) of a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        document = json.loads(metadata[STATE_KEY])
        state = unflatten_state(document, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is truncated, corrupt or not an spvit checkpoint ({e!r:.200})") from None
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return model_state, state


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every global RNG a training step draws from: Python, NumPy, torch's CPU RNG and that of `device` (a GPU's
    dropout draws from its own generator), with the device's type so that a resume elsewhere leaves it alone."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["device"] = {"type": "cuda", "rng": torch.cuda.get_rng_state(device)}
    elif device is not None and device.type == "mps":
        state["device"] = {"type": "mps", "rng": torch.mps.get_rng_state()}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s RNGs; the device's only when the checkpoint was written on the same kind of device
    (a run resumed on another device continues, but not bit-identically)."""
    random.setstate(state["python"])
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    saved = state.get("device")
    if saved is None or device is None or saved["type"] != device.type:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng"], device)
    else:
        torch.mps.set_rng_state(saved["rng"])

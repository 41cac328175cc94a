"""State dicts: tensor-only checkpoint loading (safetensors, or a pickle read with `weights_only=True`), and
naming a submodule's state as its parent does."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# Containers that training scripts (timm, DeiT, ours) wrap a state dict in, most specific first.
_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with `prefix` before every key: a submodule's state as its parent names it."""
    return {prefix + k: v for k, v in state.items()}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`, or from `.pth`/`.pt` with `weights_only=True`.

    Never unpickles arbitrary objects: a pickle that holds anything but tensors and plain containers
    is refused. Wrappers such as `{"model": state_dict}` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds Python objects other than tensors, and loading them "
            f"could run arbitrary code ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"checkpoint {path} holds no state dict: expected tensors or one of the keys "
                f"{', '.join(_STATE_DICT_KEYS)}, found keys {sorted(map(str, obj))[:8]}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())

"""Run directories: a run's settings are its `config.json`; a run is never overwritten, only resumed."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Self, TypeVar

import torch

from finetune.devices import resolve_amp, resolve_device
from finetune.engine import CHECKPOINT
from supernets.io import remove_stale_temporaries

CONFIG = "config.json"
SUMMARY = "summary.json"  # written last: a run directory that holds it is finished
# May differ on resume: how a run shows, where it lives and computes, not what it computes. A run resumed on another
# device continues from its checkpoint, but bit-identical resume is promised on the same device and dtype only.
NOT_SETTINGS = ("progress", "out", "device", "compile", "log_every")


class RunConfig:
    """Base of the run config dataclasses: rebuilt from a saved `config.json`, unknown fields refused."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field '{unknown[0]}'")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not _matches(value, hints[name]):
                raise ValueError(f"{name}: expected {_describe(hints[name])}, got {type(value).__name__} {value!r:.40}")
        return cls(**data)


def _matches(value: Any, hint: Any) -> bool:
    """Whether parsed JSON `value` has the type `hint` (the config fields' types: scalars, optionals, containers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is not None:  # dict[str, Any], list[float]: the container, and the items of a list
        if not isinstance(value, origin):
            return False
        args = typing.get_args(hint)
        return origin is not list or all(_matches(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    plain = typing.get_origin(hint) is None and getattr(hint, "__name__", None)
    return plain or str(hint).replace("typing.", "")


RunConfigT = TypeVar("RunConfigT", bound="RunConfig")


def resolve_compute(config: RunConfigT) -> tuple[RunConfigT, torch.device]:
    """`config` with its `device` and `amp` resolved (`auto` becomes what this machine runs: stored so in
    config.json) and the device; an unavailable device is refused before any work."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device) if hasattr(config, "amp") else None
    changes = {"device": str(device)} | ({"amp": amp} if amp is not None else {})
    return dataclasses.replace(config, **changes), device


def check_run_directory(out_dir: Path, config: RunConfig, resume: bool) -> None:
    """Refuse to overwrite a run, or to resume a finished one or one with other settings than `config`."""
    saved = out_dir / CONFIG
    if not resume:
        if (out_dir / CHECKPOINT).exists():
            raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        return
    if not (out_dir / CHECKPOINT).exists() or not saved.exists():
        raise FileNotFoundError(f"nothing to resume in {out_dir}: no {CHECKPOINT} and {CONFIG}")
    try:
        previous = type(config).from_dict(json.loads(saved.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{saved} is not a valid run config: {e}") from None
    changed = [
        f.name
        for f in fields(config)
        if f.name not in NOT_SETTINGS and getattr(previous, f.name) != getattr(config, f.name)
    ]
    if changed:
        raise ValueError(
            f"--resume with other settings than {saved}: {', '.join(changed)} differ; resume with the same settings"
        )
    if (out_dir / SUMMARY).exists():
        raise ValueError(f"{out_dir} holds a finished run ({SUMMARY} is written); there is nothing to resume")
    remove_stale_temporaries(out_dir)  # left by a writer killed mid-write; the files they were for are intact

"""Run directories: a run's settings are its `config.json`; a run is never overwritten, only resumed."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Self

from finetune.engine import CHECKPOINT

CONFIG = "config.json"
_NOT_SETTINGS = ("progress",)  # may differ on resume: they change how a run shows, not what it computes


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
        return cls(**data)


def check_run_directory(out_dir: Path, config: RunConfig, resume: bool) -> None:
    """Refuse to overwrite a run, or to resume one with other settings than `config`."""
    saved = out_dir / CONFIG
    if not resume:
        if (out_dir / CHECKPOINT).exists():
            raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        return
    if not (out_dir / CHECKPOINT).exists() or not saved.exists():
        raise FileNotFoundError(f"nothing to resume in {out_dir}: no {CHECKPOINT} and {CONFIG}")
    try:
        previous = type(config).from_dict(json.loads(saved.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{saved} is not a valid run config: {e}") from None
    changed = [
        f.name
        for f in fields(config)
        if f.name not in _NOT_SETTINGS and getattr(previous, f.name) != getattr(config, f.name)
    ]
    if changed:
        raise ValueError(
            f"--resume with other settings than {saved}: {', '.join(changed)} differ; resume with the same settings"
        )

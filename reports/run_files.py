"""Tolerant readers of the files in a run directory.

Every reader returns what it could read, or None, and appends a sentence to `warnings` for what it could
not: a report shows whatever a partial or damaged run still holds instead of failing on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from supernets.architecture import Architecture

ARCH_EPOCH = re.compile(r"arch_epoch(\d+)\.json")


def warn(warnings: list[str], message: str) -> None:
    """Collect `message` for the report (its Warnings section) and for the caller to show."""
    warnings.append(message)


def read_json_object(path: Path, warnings: list[str], *, required: bool = True) -> dict[str, Any] | None:
    """A JSON object file; a missing file is only worth a warning when `required`."""
    if not path.is_file():
        if required:
            warn(warnings, f"{path} is missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(warnings, f"{path} cannot be read ({e}); it is left out")
        return None
    if not isinstance(data, dict):
        warn(warnings, f"{path} holds a JSON {type(data).__name__}, not an object; it is left out")
        return None
    return data


def read_architecture(path: Path, warnings: list[str]) -> Architecture | None:
    try:
        return Architecture.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warn(warnings, f"{path} is not a valid architecture ({e}); it is left out")
        return None


def latest_epoch_architecture(run_dir: Path) -> Path | None:
    """The `arch_epoch{N}.json` with the largest N: what an unfinished search had found so far."""
    epochs = {int(m.group(1)): p for p in run_dir.glob("arch_epoch*.json") if (m := ARCH_EPOCH.fullmatch(p.name))}
    return epochs[max(epochs)] if epochs else None


@dataclass(frozen=True)
class Metrics:
    """`metrics.jsonl` split into training-step lines and epoch-end (validation) lines, both sorted by step."""

    steps: pd.DataFrame
    epochs: pd.DataFrame

    @classmethod
    def empty(cls) -> Metrics:
        return cls(pd.DataFrame(), pd.DataFrame())


def read_metrics(path: Path, warnings: list[str]) -> Metrics:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        warn(warnings, f"{path} cannot be read ({e}); no curves are drawn from it")
        return Metrics.empty()
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warn(warnings, f"{path}: skipped {len(bad)} malformed line(s) (line {shown}), e.g. cut short by a crash")
    is_epoch_end = [any(key.startswith("val_") for key in r) for r in records]
    return Metrics(
        steps=_frame([r for r, e in zip(records, is_epoch_end, strict=True) if not e]),
        epochs=_frame([r for r, e in zip(records, is_epoch_end, strict=True) if e]),
    )


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame.from_records(records)
    # Values that are not numbers (a string where a float belongs) become NaN rather than breaking a plot.
    frame = frame.apply(pd.to_numeric, errors="coerce")
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def read_trials(path: Path, warnings: list[str]) -> pd.DataFrame | None:
    """An Optuna study's `trials.csv` as columns number, state, accuracy, macs, params, feasible (or None)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # pandas' parser errors are ValueErrors
        warn(warnings, f"{path} cannot be read ({e}); no trials are drawn")
        return None
    # The run writes the first objective as `value`; optuna's own trials_dataframe() names them values_0, ...
    accuracy = next((c for c in ("value", "values_0", "acc1") if c in frame.columns), None)
    missing = [c for c in ("state", "macs") if c not in frame.columns] + ([] if accuracy else ["value"])
    if missing:
        warn(warnings, f"{path} has no column {', '.join(missing)}; no trials are drawn")
        return None
    trials = pd.DataFrame(
        {
            "number": frame["number"] if "number" in frame.columns else range(len(frame)),
            "state": frame["state"].astype(str).str.upper(),
            "accuracy": pd.to_numeric(frame[accuracy], errors="coerce"),
            "macs": pd.to_numeric(frame["macs"], errors="coerce"),
            "params": pd.to_numeric(frame["params"], errors="coerce") if "params" in frame.columns else float("nan"),
        }
    )
    if "feasible" in frame.columns:
        # Written as True/False, or empty for a trial that never got its MACs.
        trials["feasible"] = frame["feasible"].map({True: True, False: False, "True": True, "False": False})
    return trials

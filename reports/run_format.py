"""The run-directory format: the names of a run's files and its kinds, shared by the runs that write them and the
reports that read them. Pure Python (no torch, no pandas), so that a report imports it cheaply.

Every run directory holds `config.json` (its settings, under `kind`) and, once finished, `summary.json` (its
figures, under the same `kind`). A run's kind decides the rest:

- `search` (`spvit search`): `lut.csv`, `metrics.jsonl`, `arch_epoch{N}.json` after every epoch,
  `checkpoint.safetensors` (resume state), and at the end `arch.json` and `supernet.safetensors`;
- `optuna` (`spvit search --strategy optuna`): `lut.csv`, `supernet.safetensors`, `study.journal`, `trials.csv`,
  `pareto.json` and the best `arch.json`;
- `finetune` (`spvit finetune`): `metrics.jsonl`, `checkpoint.safetensors`, `best/` and `last/` (subnet
  directories) and `arch.json`.
"""

from __future__ import annotations

from typing import Any

CONFIG = "config.json"
SUMMARY = "summary.json"  # written last: a run directory that holds it is finished
ARCH = "arch.json"
METRICS = "metrics.jsonl"
LUT = "lut.csv"
CHECKPOINT = "checkpoint.safetensors"  # the training engine's resume state
SUPERNET = "supernet.safetensors"
TRIALS = "trials.csv"
PARETO = "pareto.json"
JOURNAL = "study.journal"
BEST = "best"
LAST = "last"

SEARCH = "search"
OPTUNA = "optuna"
FINETUNE = "finetune"
KINDS = (SEARCH, OPTUNA, FINETUNE)
SEARCH_KINDS = (SEARCH, OPTUNA)  # the kinds whose architecture a search found (and a fine-tune may come from)
KIND_KEY = "kind"  # the key of the kind in config.json and summary.json


def epoch_arch(epoch: int) -> str:
    """The architecture a search stood at after `epoch` (counted from 1)."""
    return f"arch_epoch{epoch}.json"


def recorded_kind(*documents: dict[str, Any] | None) -> str | None:
    """The kind the first of `documents` (a run's summary.json, config.json) that records a known one says; None
    for runs written before runs recorded their kind."""
    for document in documents:
        kind = (document or {}).get(KIND_KEY)
        if kind in KINDS:
            return kind
    return None

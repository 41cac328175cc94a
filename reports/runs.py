"""Run directories as a report sees them: what kind of run each is, what it holds, and which belong together.

Kinds: `search` (a gradient search, `spvit search`), `optuna` (a study) and `finetune` (`spvit finetune`), as the
run's summary.json or config.json records it (`run_format`); a run written before runs recorded their kind is
recognised by its files. A directory without run files whose subdirectories are runs (`runs/demo`)
stands for those runs. A fine-tune is linked to the search it came from, and the two become one report
run: through its config's `search_run` when that directory exists, else with a search passed alongside
that produced the very architecture it fine-tuned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from supernets.architecture import Architecture

from .costs import CostTable, read_cost_table
from .run_files import (
    Metrics,
    latest_epoch_architecture,
    read_architecture,
    read_json_object,
    read_metrics,
    read_trials,
    warn,
)
from .run_format import (
    ARCH,
    BEST,
    CONFIG,
    FINETUNE,
    LUT,
    METRICS,
    OPTUNA,
    SEARCH,
    SEARCH_KINDS,
    SUMMARY,
    SUPERNET,
    TRIALS,
    recorded_kind,
)

RUN_FILES = (CONFIG, SUMMARY, METRICS, ARCH, LUT, TRIALS)
CONTAINER_DEPTH = 3  # runs/study/finetune/seed0: how deep a directory of runs is searched for runs


@dataclass
class RunDir:
    """What one run directory holds; None (or empty frames) for what is missing or unreadable."""

    path: Path
    kind: str  # search, optuna, finetune, or unknown
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    metrics: Metrics = field(default_factory=Metrics.empty)
    arch: Architecture | None = None
    costs: CostTable | None = None
    trials: pd.DataFrame | None = None


@dataclass
class ReportRun:
    """One run of the report: a search or study, a fine-tune, or a search with the fine-tune of its result."""

    label: str
    search: RunDir | None = None  # a search or a study (or a run directory of unknown kind)
    finetune: RunDir | None = None

    @property
    def parts(self) -> list[RunDir]:
        return [r for r in (self.search, self.finetune) if r is not None]

    @property
    def arch(self) -> Architecture | None:
        """The searched architecture; a lone fine-tune's own."""
        return next((r.arch for r in self.parts if r.arch is not None), None)

    @property
    def costs(self) -> CostTable | None:
        return self.search.costs if self.search is not None else None

    def figure(self, key: str) -> Any:
        """A summary figure, the search's first (its MACs are the lookup table's), then the fine-tune's."""
        return next((r.summary[key] for r in self.parts if r.summary and r.summary.get(key) is not None), None)

    @property
    def search_acc1(self) -> float | None:
        return _number(self.search.summary.get("val_acc1")) if self.search and self.search.summary else None

    @property
    def finetuned_acc1(self) -> float | None:
        summary = self.finetune.summary if self.finetune else None
        return _number(summary.get("val_acc1")) if summary else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def has_run_files(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def classify(path: Path, config: dict[str, Any] | None, summary: dict[str, Any] | None) -> str:
    """The kind the run records; for a run written before runs recorded it, the kind its files suggest."""
    kind = recorded_kind(summary, config)
    if kind is not None:
        return kind
    if (path / TRIALS).is_file():
        return OPTUNA
    if "subnet" in (config or {}) or (path / BEST).is_dir():
        return FINETUNE
    if (path / LUT).is_file() or "target" in (config or {}) or (path / SUPERNET).is_file():
        return SEARCH
    return "unknown"


def read_run_dir(path: Path, warnings: list[str]) -> RunDir:
    """Read every file a run of its kind should hold, warning about each one missing or unreadable."""
    config = read_json_object(path / CONFIG, warnings)
    summary_path = path / SUMMARY
    summary = read_json_object(summary_path, warnings, required=False)
    kind = classify(path, config, summary)
    run = RunDir(path, kind, config, summary)
    if kind == "unknown":
        warn(warnings, f"{path} is not a search, Optuna or fine-tune run; only its files that fit are shown")
    if summary is None and not summary_path.exists():
        warn(warnings, f"{summary_path} is missing: the run has not finished (or was stopped)")
    if (path / METRICS).is_file():
        run.metrics = read_metrics(path / METRICS, warnings)
    elif kind != OPTUNA:  # a study trains nothing
        warn(warnings, f"{path / METRICS} is missing: no training curves")
    run.arch = _architecture(path, kind, warnings)
    if kind in SEARCH_KINDS:
        if (path / LUT).is_file():
            run.costs = read_cost_table(path / LUT, warnings)
        else:
            warn(warnings, f"{path / LUT} is missing: per-block MACs and params are not shown")
    if (path / TRIALS).is_file():
        run.trials = read_trials(path / TRIALS, warnings)
    return run


def _architecture(path: Path, kind: str, warnings: list[str]) -> Architecture | None:
    if (path / ARCH).is_file():
        return read_architecture(path / ARCH, warnings)
    latest = latest_epoch_architecture(path) if kind == SEARCH else None
    if latest is None:
        warn(warnings, f"{path / ARCH} is missing: no architecture to show")
        return None
    warn(warnings, f"{path / ARCH} is missing; showing {latest.name}, the last epoch's (not projected)")
    return read_architecture(latest, warnings)


def find_run_dirs(paths: list[Path], warnings: list[str]) -> list[Path]:
    """The run directories `paths` name, directories of runs expanded, each directory once, in order."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            warn(warnings, f"{path} does not exist")
        elif not path.is_dir():
            warn(warnings, f"{path} is not a directory")
        elif has_run_files(path):
            found.append(path)
        else:
            nested = _runs_below(path, CONTAINER_DEPTH)
            if not nested:
                warn(warnings, f"{path} holds no run files ({', '.join(RUN_FILES)}) and no run directories")
            found.extend(nested)
    unique = list({p.resolve(): p for p in reversed(found)}.values())[::-1]
    if len(unique) < len(found):
        warn(warnings, f"{len(found) - len(unique)} run directory(ies) given more than once are shown once")
    return unique


def _runs_below(path: Path, depth: int) -> list[Path]:
    """Runs in the subdirectories of `path`. A container holds other things too (a demo's cached dense
    model, its exported subnet, an earlier report): only searches, studies and fine-tunes count."""
    runs: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if has_run_files(child):
            config = read_json_object(child / CONFIG, [], required=False)
            summary = read_json_object(child / SUMMARY, [], required=False)
            if classify(child, config, summary) != "unknown":
                runs.append(child)
        elif depth > 1:
            runs.extend(_runs_below(child, depth - 1))
    return runs


def link_runs(run_dirs: list[RunDir], warnings: list[str]) -> list[ReportRun]:
    """Pair every fine-tune with its search (read from disk when it was not passed); the rest stand alone.

    A search fine-tuned several times (seeds, distillation settings) is one report run per fine-tune.
    """
    searches = {r.path.resolve(): r for r in run_dirs if r.kind in SEARCH_KINDS}
    pairs: dict[int, ReportRun] = {}
    for run in run_dirs:
        if run.kind != FINETUNE:
            continue
        search = _recorded_search(run, searches, warnings) or _search_by_architecture(run, list(searches.values()))
        if search is not None and run.arch is not None and search.arch is not None and run.arch != search.arch:
            warn(
                warnings,
                f"{run.path} fine-tuned another architecture than {search.path} found (exported with --round-mlp?); "
                f"the report shows the search's",
            )
        pairs[id(run)] = ReportRun("", search=search, finetune=run)
    fine_tuned = {id(p.search) for p in pairs.values()}
    report_runs = [pairs.get(id(r)) or ReportRun("", search=r) for r in run_dirs if id(r) not in fine_tuned]
    labels = unique_labels([r.parts[0].path for r in report_runs])
    for run, label in zip(report_runs, labels, strict=True):
        run.label = f"{label} + {run.finetune.path.name}" if run.search and run.finetune else label
    return report_runs


def _recorded_search(run: RunDir, searches: dict[Path, RunDir], warnings: list[str]) -> RunDir | None:
    recorded = (run.config or {}).get("search_run")
    if not recorded:
        return None
    candidates = [Path(recorded)] if Path(recorded).is_absolute() else [Path(recorded), run.path / recorded]
    path = next((p for p in candidates if p.is_dir()), None)
    if path is None:
        warn(warnings, f"{run.path}: its search run {recorded} does not exist; the fine-tune is shown alone")
        return None
    if path.resolve() in searches:
        return searches[path.resolve()]
    search = read_run_dir(path, warnings)
    if search.kind not in SEARCH_KINDS:
        warn(warnings, f"{run.path}: its search run {recorded} is not a search; the fine-tune is shown alone")
        return None
    searches[path.resolve()] = search  # read here: the next fine-tune of the same search shares it
    return search


def _search_by_architecture(run: RunDir, searches: list[RunDir]) -> RunDir | None:
    if run.arch is None:
        return None
    return next((s for s in searches if s.arch == run.arch), None)


def unique_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell them apart: `search`, or `demo/search`, ..."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    if not parts:
        return []
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1

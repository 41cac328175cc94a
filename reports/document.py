"""`write_report`: run directories in, `index.html` (self-contained) + `report.md` + the PNGs out.

A report is a list of sections, each a heading and its items (text, tables, figures), rendered twice:
as Markdown that links the PNG files next to it, and as HTML with the same images embedded, so
`index.html` can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from . import plots
from .costs import CostTable, architecture_table, block_costs
from .run_files import warn
from .runs import ReportRun, find_run_dirs, link_runs, read_run_dir
from .table_text import cell_text, markdown_table

REPORT_FILES = ("index.html", "report.md")


@dataclass
class Table:
    caption: str
    frame: pd.DataFrame


@dataclass
class Image:
    caption: str
    file: str  # PNG file name inside the report directory
    png: bytes


@dataclass
class Section:
    title: str
    items: list[str | Table | Image] = field(default_factory=list)


@dataclass
class Report:
    """What `write_report` wrote; `tables` by caption are the DataFrames behind the tables shown."""

    out_dir: Path
    runs: list[ReportRun]
    sections: list[Section]
    warnings: list[str]

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        return {t.caption: t.frame for s in self.sections for t in s.items if isinstance(t, Table)}

    @property
    def images(self) -> list[Path]:
        return [self.out_dir / i.file for s in self.sections for i in s.items if isinstance(i, Image)]


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Report:
    """Report on `run_dirs` (runs, or directories of runs such as a demo's) into `out_dir`.

    What a run directory lacks or holds damaged is left out with a warning, listed at the top of the
    report. The report replaces an earlier one in `out_dir` whole, or not at all; a non-empty `out_dir`
    that is not a report is refused (`ValueError`), as is a list of paths that holds no run at all.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    warnings: list[str] = []
    paths = find_run_dirs([Path(p) for p in run_dirs], warnings)
    if not paths:
        raise ValueError(f"no run directory to report on in {', '.join(map(str, run_dirs))}: {'; '.join(warnings)}")
    runs = link_runs([read_run_dir(p, warnings) for p in paths], warnings)
    sections = [run_section(run, warnings) for run in runs]
    if len(runs) > 1:
        sections.insert(0, comparison_section(runs))
    report = Report(out, runs, sections, warnings)
    _write_atomically(report)
    return report


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in REPORT_FILES):
        raise ValueError(f"--out {out} is a non-empty directory without a report; refusing to replace it")


def run_section(run: ReportRun, warnings: list[str]) -> Section:
    section = Section(run.label)
    slug = _slug(run.label)
    section.items.append(Table(f"{run.label}: summary", summary_table(run)))
    costs_frame = None
    if run.arch is not None:
        table = _fitting_costs(run, warnings)
        section.items.append(Table(f"{run.label}: architecture", architecture_table(run.arch, table)))
        section.items.append(_image(plots.block_map(run.arch), f"{slug}_block_map.png", "mixer per block"))
        if table is not None:
            costs_frame = block_costs(run.arch, table)
    if costs_frame is not None:
        section.items.append(_image(plots.block_macs(costs_frame), f"{slug}_block_macs.png", "MACs per block"))
        section.items.append(_image(plots.mlp_ratio(costs_frame), f"{slug}_mlp_ratio.png", "MLP ratio per block"))
    if run.search is not None:
        steps, epochs = run.search.metrics.steps, run.search.metrics.epochs
        figures = [
            (plots.gate_trajectories(steps), "gates", "gate probabilities over the search"),
            (plots.macs_over_steps(steps, epochs), "macs", "MACs vs target over the search"),
            (plots.training_curves(steps, epochs, "search"), "search_curves", "search loss and accuracy"),
        ]
        if run.search.trials is not None:
            trials = plots.optuna_trials(run.search.trials, run.figure("target_macs"), run.figure("dense_macs"))
            figures.append((trials, "trials", "Optuna trials"))
        section.items += [_image(f, f"{slug}_{name}.png", caption) for f, name, caption in figures if f is not None]
    if run.finetune is not None:
        metrics = run.finetune.metrics
        curves = plots.training_curves(metrics.steps, metrics.epochs, "fine-tune")
        if curves is not None:
            section.items.append(_image(curves, f"{slug}_finetune_curves.png", "fine-tune loss and accuracy"))
    return section


def _fitting_costs(run: ReportRun, warnings: list[str]) -> CostTable | None:
    """The search's lookup table if the architecture fits it; else None, with a warning."""
    if run.costs is None or run.arch is None:
        return None
    try:
        run.costs.check(run.arch)
    except ValueError as e:
        warn(warnings, f"{run.label}: the architecture does not fit its lookup table ({e}); costs are not shown")
        return None
    return run.costs


def summary_table(run: ReportRun) -> pd.DataFrame:
    """The run's headline figures: what it searched for, what it found and what fine-tuning made of it."""
    dense_macs = run.figure("dense_macs") or (run.costs.dense_macs() if run.costs else None)
    macs = run.figure("macs")
    rows = {
        "runs": ", ".join(f"{r.kind} {r.path}" for r in run.parts),
        "model": run.figure("model") or (run.arch.model if run.arch else None),
        "target MACs": _count(run.figure("target_macs")),
        "MACs": _count(macs),
        "x dense MACs": f"{macs / dense_macs:.3f}" if macs and dense_macs else None,
        "dense MACs": _count(dense_macs),
        "params": _count(run.figure("params")),
        "dense params": _count(run.figure("dense_params")),
        "val top-1 after search (%)": _percent(run.search_acc1),
        "val top-1 fine-tuned (%)": _percent(run.finetuned_acc1),
        "teacher val top-1 (%)": _percent(run.finetune.summary.get("teacher_val_acc1"))
        if run.finetune and run.finetune.summary
        else None,
        "search epochs": run.search.summary.get("epochs") if run.search and run.search.summary else None,
        "fine-tune epochs": run.finetune.summary.get("epochs") if run.finetune and run.finetune.summary else None,
    }
    shown = {k: v for k, v in rows.items() if v is not None}
    return pd.DataFrame({"value": [str(v) for v in shown.values()]}, index=pd.Index(list(shown), name="figure"))


def comparison_section(runs: list[ReportRun]) -> Section:
    rows = pd.DataFrame(
        {
            "label": [r.label for r in runs],
            "kind": [" + ".join(p.kind for p in r.parts) for r in runs],
            "macs": [r.figure("macs") for r in runs],
            "dense_macs": [r.figure("dense_macs") for r in runs],
            "params": [r.figure("params") for r in runs],
            "search_acc1": [r.search_acc1 for r in runs],
            "finetuned_acc1": [r.finetuned_acc1 for r in runs],
        }
    )
    rows["x_dense"] = rows.macs / rows.dense_macs
    rows["acc1"] = rows.finetuned_acc1.fillna(rows.search_acc1)
    shown = rows[["label", "kind", "macs", "x_dense", "params", "search_acc1", "finetuned_acc1"]]
    section = Section("Comparison", [Table("comparison", shown.set_index("label"))])
    dense = rows.dense_macs.dropna()
    # A relative axis only when every run prices against the same dense model.
    figure = plots.accuracy_vs_macs(rows, dense.iloc[0] if dense.nunique() == 1 else None)
    if figure is not None:
        section.items.append(
            _image(figure, "comparison_accuracy_vs_macs.png", "accuracy vs MACs (fine-tuned top-1 where there is one)")
        )
    return section


def _image(figure: Figure, file: str, caption: str) -> Image:
    return Image(caption, file, plots.png_bytes(figure))


def _count(value: object) -> str | None:
    return f"{int(value):,}" if isinstance(value, int | float) and not isinstance(value, bool) else None


def _percent(value: object) -> str | None:
    return f"{float(value):.2f}" if isinstance(value, int | float) and not isinstance(value, bool) else None


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "run"


def render_markdown(report: Report) -> str:
    lines = ["# spvit-search report", ""]
    if report.warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in report.warnings], ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for item in section.items:
            if isinstance(item, Table):
                lines += [f"**{item.caption}**", "", markdown_table(item.frame), ""]
            elif isinstance(item, Image):
                lines += [f"![{item.caption}]({item.file})", ""]
            else:
                lines += [item, ""]
    return "\n".join(lines)


def render_html(report: Report) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>spvit-search report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>spvit-search report</h1>",
    ]
    if report.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings)
        parts.append(f'<div class="warnings"><h2>Warnings</h2><ul>{items}</ul></div>')
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for item in section.items:
            if isinstance(item, Table):
                table = item.frame.map(cell_text).to_html(escape=True)
                parts.append(f"<h3>{html.escape(item.caption)}</h3>{table}")
            elif isinstance(item, Image):
                data = base64.b64encode(item.png).decode("ascii")
                caption = html.escape(item.caption)
                image = f'<img src="data:image/png;base64,{data}" alt="{caption}">'
                parts.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
            else:
                parts.append(f"<p>{html.escape(item)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "img{max-width:100%}figcaption{font-size:12px;color:#555}"
    ".warnings{background:#fff4e5;border:1px solid #f0a040;padding:0 1em}"
)


def _write_atomically(report: Report) -> None:
    """Write every file into a fresh sibling directory, then swap it in for `out_dir`: a crash leaves
    the earlier report (or none), never a mix."""
    out = report.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for section in report.sections:
            for item in section.items:
                if isinstance(item, Image):
                    (staging / item.file).write_bytes(item.png)
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (staging / "index.html").write_text(render_html(report), encoding="utf-8")
        retired = None
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, retired / out.name)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)

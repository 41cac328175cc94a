"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display needed).

Every function returns a `Figure`, or None when the data it needs is absent (a run stopped early, a
metric a run of its kind does not log).
"""

from __future__ import annotations

import io

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from supernets.architecture import MIXERS, Architecture

MIXER_COLORS = {"skip": "#d9d9d9", "bconv1": "#9ecae1", "bconv3": "#3182bd", "msa": "#e6550d"}
MLP_COLOR = "#74c476"
DENSE_COLOR = "#bdbdbd"
GATES = ("bconv1", "bconv3", "msa", "mlp")  # per block in metrics.jsonl as gate.{i}.{gate}
DPI = 110


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def block_macs(costs: pd.DataFrame) -> Figure:
    """Per block, the dense MACs (left bar) next to the pruned ones (right bar), each stacked mixer + MLP.

    `costs` is `block_costs`' frame: mixer, mixer_macs, mlp_macs, dense_mixer_macs, dense_mlp_macs.
    """
    figure, (axes,) = _figure(max(6.0, 0.45 * len(costs)), 3.4)
    x = pd.RangeIndex(len(costs)).to_numpy()
    width = 0.38
    scale = 1e6
    axes.bar(x - width / 2, costs.dense_mixer_macs / scale, width, color=DENSE_COLOR, edgecolor="white")
    axes.bar(
        x - width / 2, costs.dense_mlp_macs / scale, width, bottom=costs.dense_mixer_macs / scale,
        color=DENSE_COLOR, edgecolor="white", hatch="//",
    )  # fmt: skip
    mixer_colors = [MIXER_COLORS.get(m, "#756bb1") for m in costs.mixer]
    axes.bar(x + width / 2, costs.mixer_macs / scale, width, color=mixer_colors, edgecolor="white")
    axes.bar(x + width / 2, costs.mlp_macs / scale, width, bottom=costs.mixer_macs / scale, color=MLP_COLOR)
    handles = [Patch(color=DENSE_COLOR, label="dense (hatched: MLP)")]
    handles += [Patch(color=MIXER_COLORS[m], label=f"pruned {m}") for m in MIXERS if m in set(costs.mixer)]
    handles.append(Patch(color=MLP_COLOR, label="pruned MLP"))
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_xticks(x)
    axes.set_xlabel("block")
    axes.set_ylabel("MMACs")
    axes.set_title("MACs per block: dense (left) and pruned (right)")
    return figure


def mlp_ratio(costs: pd.DataFrame) -> Figure:
    """The share of MLP hidden units each block keeps."""
    figure, (axes,) = _figure(max(6.0, 0.45 * len(costs)), 2.8)
    x = pd.RangeIndex(len(costs)).to_numpy()
    axes.bar(x, costs.mlp_ratio, color=MLP_COLOR)
    for i, (kept, total) in enumerate(zip(costs.mlp_kept, costs.mlp_total, strict=True)):
        axes.annotate(f"{kept}/{total}", (i, costs.mlp_ratio.iloc[i]), ha="center", va="bottom", fontsize=6)
    axes.set_ylim(0, 1.12)
    axes.set_xticks(x)
    axes.set_xlabel("block")
    axes.set_ylabel("MLP units kept")
    axes.set_title("MLP ratio per block")
    return figure


def block_map(arch: Architecture) -> Figure:
    """One cell per block, coloured by its mixer and labelled with its MLP width."""
    figure, (axes,) = _figure(max(6.0, 0.55 * arch.depth), 1.3)
    for i, (mixer, kept) in enumerate((b.mixer, b.mlp_kept) for b in arch.blocks):
        axes.add_patch(Rectangle((i + 0.04, 0.06), 0.92, 0.88, color=MIXER_COLORS.get(mixer, "#756bb1")))
        axes.text(i + 0.5, 0.62, mixer, ha="center", va="center", fontsize=7)
        axes.text(i + 0.5, 0.3, f"mlp {len(kept)}", ha="center", va="center", fontsize=6)
    axes.set_xlim(0, arch.depth)
    axes.set_ylim(0, 1)
    axes.set_yticks([])
    axes.set_xticks([i + 0.5 for i in range(arch.depth)], [str(i) for i in range(arch.depth)], fontsize=7)
    axes.set_xlabel("block")
    axes.set_title("mixer per block")
    return figure


def gate_trajectories(steps: pd.DataFrame) -> Figure | None:
    """P(gate on) per block over the search: the cumulative attention gates and the mean MLP unit gate."""
    gates = [g for g in GATES if any(c.endswith(f".{g}") and c.startswith("gate.") for c in steps.columns)]
    if steps.empty or not gates:
        return None
    figure, axes = _figure(3.0 * len(gates), 2.8, ncols=len(gates))
    depth = 1 + max(int(c.split(".")[1]) for c in steps.columns if c.startswith("gate."))
    colors = [f"C{i % 10}" for i in range(depth)]
    for ax, gate in zip(axes, gates, strict=True):
        for block in range(depth):
            column = f"gate.{block}.{gate}"
            if column in steps.columns:
                ax.plot(steps.step, steps[column], color=colors[block], linewidth=1, label=str(block))
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"P({gate} on)" if gate != "mlp" else "mean P(MLP unit on)", fontsize=9)
        ax.set_xlabel("step")
    axes[-1].legend(title="block", fontsize=6, title_fontsize=7, ncols=2 if depth > 8 else 1, loc="best")
    return figure


def macs_over_steps(steps: pd.DataFrame, epochs: pd.DataFrame) -> Figure | None:
    """The gates' expected MACs at every step and the deterministic architecture's at every epoch end,
    against the target."""
    if steps.empty or "macs" not in steps.columns:
        return None
    figure, (axes,) = _figure(6.0, 3.0)
    axes.plot(steps.step, steps.macs / 1e6, linewidth=1, label="sampled gates (train step)")
    if not epochs.empty and "val_macs" in epochs.columns:
        axes.plot(epochs.step, epochs.val_macs / 1e6, "o-", label="architecture (epoch end)")
    if "target_macs" in steps.columns:
        axes.plot(steps.step, steps.target_macs / 1e6, "k--", linewidth=1, label="target")
    axes.set_xlabel("step")
    axes.set_ylabel("MMACs")
    axes.set_title("MACs vs target")
    axes.legend(fontsize=7)
    return figure


def training_curves(steps: pd.DataFrame, epochs: pd.DataFrame, title: str) -> Figure | None:
    """Loss (and its parts) per step, and train top-1 (smoothed) with val top-1 per epoch."""
    losses = [c for c in ("loss", "ce", "complexity", "kd", "base") if c in steps.columns]
    if steps.empty or not losses:
        return None
    figure, (left, right) = _figure(9.0, 3.0, ncols=2)
    smoothing = max(1, len(steps) // 50)
    for column in losses:
        left.plot(steps.step, steps[column].rolling(smoothing, min_periods=1).mean(), linewidth=1, label=column)
    left.set_xlabel("step")
    left.set_title(f"{title}: loss")
    left.legend(fontsize=7)
    if "acc1" in steps.columns:
        right.plot(steps.step, steps.acc1.rolling(smoothing, min_periods=1).mean(), linewidth=1, label="train top-1")
    if not epochs.empty and "val_acc1" in epochs.columns:
        right.plot(epochs.step, epochs.val_acc1, "o-", label="val top-1")
    right.set_xlabel("step")
    right.set_ylabel("%")
    right.set_title(f"{title}: accuracy")
    right.legend(fontsize=7)
    return figure


def pareto_front(points: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """The rows no other row beats: none has lower-or-equal `cost` with a strictly higher `value`
    (or equal value at strictly lower cost); sorted by cost."""
    ordered = points.dropna(subset=[cost, value]).sort_values([cost, value], ascending=[True, False])
    front, best = [], float("-inf")
    for index, row in ordered.iterrows():
        if row[value] > best:
            front.append(index)
            best = row[value]
    return ordered.loc[front]


def accuracy_vs_macs(runs: pd.DataFrame, dense_macs: float | None) -> Figure | None:
    """Each run at its MACs and top-1, the Pareto front through them. `runs`: label, macs, acc1."""
    runs = runs.dropna(subset=["macs", "acc1"])
    if runs.empty:
        return None
    figure, (axes,) = _figure(6.0, 3.6)
    scale, unit = (dense_macs, "x dense MACs") if dense_macs else (1e6, "MMACs")
    axes.scatter(runs.macs / scale, runs.acc1, zorder=3)
    for _, run in runs.iterrows():
        axes.annotate(run.label, (run.macs / scale, run.acc1), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(runs, "macs", "acc1")
    axes.step(front.macs / scale, front.acc1, where="post", color="C3", linewidth=1, label="Pareto front")
    axes.set_xlabel(unit)
    axes.set_ylabel("val top-1 (%)")
    axes.set_title("accuracy vs MACs")
    axes.legend(fontsize=7)
    return figure


def optuna_trials(trials: pd.DataFrame, target_macs: float | None, dense_macs: float | None) -> Figure | None:
    """Every trial that got its MACs: completed ones at their accuracy, pruned (over budget) ones on the
    x axis; the Pareto front of the completed trials within the budget."""
    trials = trials.dropna(subset=["macs"])
    if trials.empty:
        return None
    scale, unit = (dense_macs, "x dense MACs") if dense_macs else (1e6, "MMACs")
    complete = trials[(trials.state == "COMPLETE") & trials.accuracy.notna()]
    others = trials.drop(complete.index)
    figure, (axes,) = _figure(6.0, 3.6)
    floor = complete.accuracy.min() if not complete.empty else 0.0
    if not others.empty:
        axes.scatter(others.macs / scale, [floor] * len(others), marker="x", color="grey", label="pruned / failed")
    within = complete if target_macs is None else complete[complete.macs <= target_macs]
    axes.scatter(complete.macs / scale, complete.accuracy, color="C0", s=14, label="completed trial")
    front = pareto_front(within, "macs", "accuracy")
    if not front.empty:
        axes.step(front.macs / scale, front.accuracy, where="post", color="C3", label="Pareto front (in budget)")
    if target_macs is not None:
        axes.axvline(target_macs / scale, color="k", linestyle="--", linewidth=1, label="budget")
    axes.set_xlabel(unit)
    axes.set_ylabel("val top-1 (%), shared weights")
    axes.set_title(f"Optuna trials ({len(trials)})")
    axes.legend(fontsize=7)
    return figure


def mean_accuracy_vs_macs(points: pd.DataFrame) -> Figure | None:
    """Mean top-1 with a ±1 std bar over seeds, per method, against MACs relative to dense.

    `points`: method, x_dense, acc1_mean, acc1_std; one line per method through its budgets.
    """
    points = points.dropna(subset=["x_dense", "acc1_mean"])
    if points.empty:
        return None
    figure, (axes,) = _figure(6.0, 3.6)
    for i, (method, group) in enumerate(points.groupby("method", sort=False)):
        group = group.sort_values("x_dense")
        axes.errorbar(
            group.x_dense, group.acc1_mean, yerr=group.acc1_std, marker="o", capsize=3, color=f"C{i}", label=method
        )
    axes.set_xlabel("x dense MACs")
    axes.set_ylabel("val top-1 (%), mean ± std over seeds")
    axes.set_title("accuracy vs MACs")
    axes.legend(fontsize=7)
    return figure

"""The lookup-table file, read without torch: its format, its validation and the rules that price an
architecture from its rows. `LookupTable` and the reports both read tables through this module.

A table is a CSV with one leading `#` line of JSON metadata. Its rows are self-describing, so that pricing an
architecture needs no knowledge of its family:
- the optional `width` column names the embedding width a row prices; an architecture is priced at its
  `embed_dim` field, and a table of one width has 0 there;
- a block's extra msa rows (item `msa_groups`) each price one pass of its msa at one value of an architecture
  field, their `choice` a selector `FIELD[i][j]=V` (e.g. `groups[1][0]=4`: the pass whose count is
  `arch.groups[1][0]`, at 4). An architecture's msa costs the sum of the rows its fields select.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from supernets.architecture import MIXERS, Architecture, check_type

FORMAT = "spvit-search lookup table"
FORMAT_VERSION = 1
COLUMNS = ["block", "item", "choice", "macs", "params", "units"]
META_TYPES = {"model": str, "img_size": int, "num_classes": int, "model_kwargs": dict, "convention": str}
CHOICES = "discrete_choices"  # the optional header field of a supernet with choices outside its blocks
SKIP_MIXER = "skip_mixer"  # the optional header field of a table whose skip rows price the affine skip
LATENCY_HEADER = "latency"  # the optional header field of a measured latency table: its context and correction
LATENCY, SPREAD = "latency_ms", "latency_spread_ms"  # the optional columns of such a table: median and spread
LATENCY_COLUMNS = [LATENCY, SPREAD]
MLP_WIDTH = "mlp_width"  # the item of a latency table's MLP curve rows; their `units` are the kept width
WIDTH = "width"  # the optional column: the embedding width a row prices (0: the supernet's only one)
WIDTH_FIELD = "embed_dim"  # the architecture field that picks the width
# The `item` of the extra msa rows (named after the first choice that needed them, the group splits).
EXTRA_MSA = "msa_groups"
_SELECTOR = re.compile(r"([a-z_]+)((?:\[\d+\])+)=(\d+)")


def read_table_text(text: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """The header and the rows of a table file's text, with typed columns (`width` added as 0 where absent);
    `ValueError` saying what is wrong otherwise."""
    first, _, body = text.partition("\n")
    try:
        meta = json.loads(first.removeprefix("#").strip())
    except json.JSONDecodeError as e:
        raise ValueError(f"its first line is not the JSON header ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"its header does not name the format '{FORMAT}'")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')!r} is not {FORMAT_VERSION}")
    for name, expected in META_TYPES.items():
        if name not in meta:
            raise ValueError(f"header: {name}: required field is missing")
        check_type(f"header: {name}", meta[name], expected)
    check_type(f"header: {SKIP_MIXER}", meta.get(SKIP_MIXER, "identity"), str)
    check_type(f"header: {LATENCY_HEADER}", meta.get(LATENCY_HEADER, {}), dict)
    check_type(f"header: {CHOICES}", meta.get(CHOICES, {}), dict)
    for name, values in meta.get(CHOICES, {}).items():
        check_type(f"header: {CHOICES}.{name}", values, list)
    # keep_default_na: the `choice` of MLP rows is an empty string, not a missing value.
    frame = pd.read_csv(io.StringIO(body), keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"missing columns {missing}")
    if WIDTH not in frame.columns:
        frame[WIDTH] = 0
    for column in ("block", "macs", "params", "units", WIDTH):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][numbers.isna() | (numbers != numbers.round())]
        if len(bad):
            raise ValueError(f"line {bad.index[0] + 3}, column {column}: {bad.iloc[0]!r} is not an integer")
        frame[column] = numbers.astype("int64")
    if (frame[["macs", "params", "units"]] < 0).any().any():
        raise ValueError("costs must not be negative")
    frame["item"] = frame["item"].astype(str)
    frame["choice"] = frame["choice"].astype(str)
    for choice in frame.choice[frame.item == EXTRA_MSA]:
        parse_selector(choice)
    latency = [c for c in LATENCY_COLUMNS if c in frame.columns]
    if latency and LATENCY_HEADER not in meta:
        raise ValueError(f"latency columns without the header's '{LATENCY_HEADER}' field")
    for column in latency:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("float64")
    return meta, frame[[*COLUMNS, WIDTH, *latency]].reset_index(drop=True)


def table_width(arch: Architecture) -> int:
    """The width whose rows price `arch`."""
    return getattr(arch, WIDTH_FIELD) or 0


def parse_selector(choice: str) -> tuple[str, tuple[int, ...], int]:
    """(field, index path, value) of an extra msa row's `choice`, e.g. `groups[1][0]=4` -> ("groups", (1, 0), 4)."""
    match = _SELECTOR.fullmatch(choice)
    if match is None:
        raise ValueError(f"{EXTRA_MSA} choice '{choice}' is not FIELD[i][j]=V")
    field, path, value = match.groups()
    return field, tuple(int(i) for i in re.findall(r"\d+", path)), int(value)


def selected_rows(arch: Architecture, rows: Mapping[str, int]) -> list[str] | None:
    """The extra msa rows (their `choice`s) that `arch` selects; None where it has none of their fields, so that
    the plain msa row prices it."""
    chosen = []
    for choice in rows:
        field, path, value = parse_selector(choice)
        current = getattr(arch, field)
        if current is None:
            return None
        for i in path:
            current = current[i]
        if current == value:
            chosen.append(choice)
    return chosen


def dearest_selection(rows: Mapping[str, float]) -> float:
    """The most a block's msa can cost: each pass (field and index path) at its dearest value."""
    dearest: dict[tuple[str, tuple[int, ...]], float] = {}
    for choice, macs in rows.items():
        field, path, _ = parse_selector(choice)
        dearest[field, path] = max(dearest.get((field, path), 0), macs)
    return sum(dearest.values())


def latency_prediction(meta: dict[str, Any], frame: pd.DataFrame) -> LatencyPrediction | None:
    """The latency model of a table's rows of one width; None for a table without latency columns."""
    if LATENCY_HEADER not in meta or LATENCY not in frame.columns:
        return None
    header = meta[LATENCY_HEADER]
    width = int(frame[WIDTH].iloc[0]) if WIDTH in frame.columns and len(frame) else 0
    fixed_ms = header["fixed_ms"]
    if isinstance(fixed_ms, dict):  # one per width
        if str(width) not in fixed_ms:
            raise ValueError(f"header: {LATENCY_HEADER}.fixed_ms has no entry for width {width}")
        fixed_ms = fixed_ms[str(width)]
    return LatencyPrediction(frame.to_dict("records"), float(fixed_ms), header["scale"], header["offset"])


class LatencyPrediction:
    """The latency of an architecture from the table's latency columns (the rows of one width): the fixed part,
    each block's mixer (an msa by the extra msa rows the architecture selects, where it selects any) and its MLP's
    curve at the kept width (linear between the grid's points), then corrected."""

    def __init__(self, rows: list[dict[str, Any]], fixed_ms: float, scale: float, offset: float) -> None:
        self.rows, self.fixed_ms, self.scale, self.offset = rows, fixed_ms, scale, offset
        self.mixers: dict[tuple[int, str], float] = {}
        self.extra_msa: dict[int, dict[str, float]] = {}
        curves: dict[int, list[tuple[int, float]]] = {}
        for r in rows:
            if r["item"] == "mixer":
                self.mixers[r["block"], r["choice"]] = float(r[LATENCY])
            elif r["item"] == EXTRA_MSA:
                self.extra_msa.setdefault(int(r["block"]), {})[r["choice"]] = float(r[LATENCY])
            elif r["item"] == MLP_WIDTH:
                curves.setdefault(int(r["block"]), []).append((int(r["units"]), float(r[LATENCY])))
        self.curves = {b: np.array(sorted(c), dtype=np.float64) for b, c in curves.items()}  # (points, 2)

    def with_fixed(self, fixed_ms: float) -> LatencyPrediction:
        return LatencyPrediction(self.rows, fixed_ms, self.scale, self.offset)

    def mixer_table(self) -> np.ndarray:
        """Every block's latency of each mixer, (depth, 4) in MIXERS order (0 for a choice that runs nothing)."""
        return np.array([[self.mixers.get((i, m), 0.0) for m in MIXERS] for i in range(len(self.curves))])

    def dearest_msa(self) -> np.ndarray:
        """Per block, the slowest its msa runs at any of its extra msa rows' choices (its msa row without any)."""
        msa = self.mixer_table()[:, MIXERS.index("msa")]
        for block, rows in self.extra_msa.items():
            msa[block] = max(msa[block], dearest_selection(rows))
        return msa

    def dense(self) -> float:
        """The corrected latency of the dense architecture: every block msa, every MLP at its full width (its
        curve's last point)."""
        blocks = (
            self.mixers.get((i, "msa"), 0.0) + self.mlp(i, self.curves[i][-1, 0]) for i in range(len(self.curves))
        )
        return self.scale * (self.fixed_ms + sum(blocks)) + self.offset  # summed as `raw` sums an architecture

    def mlp(self, block: int, width: float) -> float:
        curve = self.curves[block]
        return float(np.interp(width, curve[:, 0], curve[:, 1]))

    def mlp_slope(self, block: int, width: float) -> float:
        """ms per kept unit of block `block`'s MLP at `width`: the slope of the grid segment holding it."""
        curve = self.curves[block]
        k = int(np.clip(np.searchsorted(curve[:, 0], width, side="right") - 1, 0, len(curve) - 2))
        (w0, t0), (w1, t1) = curve[k], curve[k + 1]
        return float((t1 - t0) / (w1 - w0))

    def block(self, arch: Architecture, index: int) -> float:
        """Block `index` of `arch`: its mixer and its MLP, uncorrected."""
        choice = arch.blocks[index]
        mixer = self.mixers.get((index, choice.mixer), 0.0)
        if choice.mixer == "msa" and index in self.extra_msa:
            selected = selected_rows(arch, self.extra_msa[index])
            if selected is not None:
                mixer = sum(self.extra_msa[index][c] for c in selected)
        return mixer + self.mlp(index, len(choice.mlp_kept))

    def raw(self, arch: Architecture) -> float:
        """The sum of the parts, uncorrected."""
        return self.fixed_ms + sum(self.block(arch, i) for i in range(arch.depth))

    def __call__(self, arch: Architecture) -> float:
        return self.scale * self.raw(arch) + self.offset

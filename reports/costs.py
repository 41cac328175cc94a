"""An architecture's MACs and parameters block by block, from a run's `lut.csv`, read without torch.

The lookup table is additive: the fixed parts (stem, tokens, final norm, head), plus per block the chosen
mixer's cost, the MLP's width-independent cost and a per-kept-unit cost times the kept width. Summing the
per-block rows of `architecture_table` and its `fixed` row therefore gives exactly what
`LookupTable.flops` and `LookupTable.params` price the architecture at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lookup_tables.table_format import (
    CHOICES,
    EXTRA_MSA,
    WIDTH,
    WIDTH_FIELD,
    LatencyPrediction,
    latency_prediction,
    read_table_text,
    selected_rows,
    table_width,
)
from supernets.architecture import CONV_KERNEL_SIZE, MIXERS, Architecture, BlockChoice

from .run_files import warn

REMOVED = "removed"  # the "mixer" of a block past a shallower architecture's depth
DENSE_MIXER = MIXERS[-1]  # the dense model's: the dearest


def kernel_size(mixer: str) -> int | None:
    """The convolution kernel of a bconv mixer; None for attention and skip."""
    return CONV_KERNEL_SIZE.get(mixer)


@dataclass(frozen=True)
class CostTable:
    """The costs at one embedding width: the full one, with every narrower width a table of its own in `narrower`
    (for a family that searches its width; empty otherwise)."""

    meta: dict[str, Any]  # model, img_size, num_classes, model_kwargs, convention (, discrete_choices)
    fixed: pd.DataFrame  # one row per fixed part, indexed by its name: macs, params
    mixers: pd.DataFrame  # indexed by (block, mixer): macs, params
    mlp: pd.DataFrame  # indexed by block: fixed_macs, fixed_params, unit_macs, unit_params, hidden
    width: int = 0  # the embedding width these rows price; 0 in a table of a single width
    narrower: dict[int, CostTable] = field(default_factory=dict)
    # Per block, its extra msa rows {choice: MACs} (see `table_format`); empty for a family without them
    extra_msa: dict[int, dict[str, int]] = field(default_factory=dict)
    latency: LatencyPrediction | None = None  # a measured latency table's model; None without latency columns

    @property
    def depth(self) -> int:
        return len(self.mlp)

    def at_width(self, width: int) -> CostTable:
        """The table of embedding width `width` (0: this one)."""
        if width in (0, self.width):
            return self
        if width not in self.narrower:
            priced = ", ".join(map(str, sorted([*self.narrower, self.width])))
            raise ValueError(f"{WIDTH_FIELD}: the architecture has {width}, the table prices {priced}")
        return self.narrower[width]

    def check(self, arch: Architecture) -> None:
        """Raise `ValueError` naming the field if `arch` is not in this table's search space."""
        for name in ("model", "img_size", "num_classes"):
            if getattr(arch, name) != self.meta.get(name):
                raise ValueError(
                    f"the architecture has {name}={getattr(arch, name)!r}, the table {self.meta.get(name)!r}"
                )
        depths = self.meta.get(CHOICES, {}).get("depth", [self.depth])  # a shallower subnet: the first blocks
        if arch.depth not in depths:
            raise ValueError(f"the architecture has {arch.depth} blocks, the table {' or '.join(map(str, depths))}")
        table = self.at_width(table_width(arch))
        for block, (mixer, kept) in enumerate((b.mixer, b.mlp_kept) for b in arch.blocks):
            if (block, mixer) not in table.mixers.index:
                raise ValueError(f"blocks[{block}].mixer: the table has no cost for '{mixer}'")
            hidden = table.mlp.hidden[block]
            if kept and (min(kept) < 0 or max(kept) >= hidden or len(set(kept)) != len(kept)):
                raise ValueError(f"blocks[{block}].mlp_kept: indices must be distinct and in [0, {hidden})")

    def dense_macs(self) -> int:
        return int(block_costs_dense(self)["macs"].sum()) + int(self.fixed.macs.sum())


def parse_cost_table(text: str) -> CostTable:
    """The table `LookupTable.save` writes, one `CostTable` per width."""
    meta, frame = read_table_text(text)
    *narrower, full = sorted(set(frame[WIDTH]))
    tables = {w: _table_at_width(meta, frame[frame[WIDTH] == w], w) for w in narrower}
    return dataclasses.replace(_table_at_width(meta, frame[frame[WIDTH] == full], full), narrower=tables)


def _table_at_width(meta: dict[str, Any], frame: pd.DataFrame, width: int) -> CostTable:
    blocks = frame[frame.block >= 0]
    mixers = blocks[blocks.item == "mixer"].set_index(["block", "choice"])[["macs", "params"]].sort_index()
    mixers.index.names = ["block", "mixer"]
    mlp_fixed = blocks[blocks.item == "mlp_fixed"].set_index("block").sort_index()
    mlp_unit = blocks[blocks.item == "mlp_unit"].set_index("block").sort_index()
    depth = int(blocks.block.max()) + 1 if len(blocks) else 0
    every_block = list(range(depth))
    if depth == 0 or list(mlp_fixed.index) != every_block or list(mlp_unit.index) != every_block:
        raise ValueError("every block needs exactly one mlp_fixed and one mlp_unit row")
    if any((block, DENSE_MIXER) not in mixers.index for block in every_block):
        raise ValueError(f"every block needs a '{DENSE_MIXER}' mixer row")
    mlp = pd.DataFrame(
        {
            "fixed_macs": mlp_fixed.macs,
            "fixed_params": mlp_fixed.params,
            "unit_macs": mlp_unit.macs,
            "unit_params": mlp_unit.params,
            "hidden": mlp_unit.units,
        }
    )
    fixed = frame[frame.block == -1].set_index("choice")[["macs", "params"]]
    extra_msa: dict[int, dict[str, int]] = {}
    for row in blocks[blocks.item == EXTRA_MSA].itertuples():
        extra_msa.setdefault(int(row.block), {})[row.choice] = int(row.macs)
    return CostTable(meta, fixed, mixers, mlp, width, extra_msa=extra_msa, latency=latency_prediction(meta, frame))


def read_cost_table(path: Path, warnings: list[str]) -> CostTable | None:
    try:
        return parse_cost_table(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # pandas' parser errors are ValueErrors
        warn(warnings, f"{path} is not a valid lookup table ({e}); per-block MACs and params are not shown")
        return None


def block_costs_dense(table: CostTable) -> pd.DataFrame:
    """Per block, the dense model's MACs and params (msa, every hidden unit kept)."""
    dense = table.mixers.xs(DENSE_MIXER, level="mixer")
    mlp = table.mlp
    return pd.DataFrame(
        {
            "mixer_macs": dense.macs,
            "mlp_macs": mlp.fixed_macs + mlp.unit_macs * mlp.hidden,
            "mixer_params": dense.params,
            "mlp_params": mlp.fixed_params + mlp.unit_params * mlp.hidden,
        }
    ).assign(macs=lambda f: f.mixer_macs + f.mlp_macs, params=lambda f: f.mixer_params + f.mlp_params)


def block_costs(arch: Architecture, table: CostTable) -> pd.DataFrame:
    """Per block of the dense model: the choice, and the MACs and params of mixer and MLP, dense (`dense_*`) and
    as chosen (at the architecture's width). Blocks past a shallower architecture's depth are `removed`.

    Raises `ValueError` if `arch` does not fit the table.
    """
    table.check(arch)
    dense = block_costs_dense(table)
    pruned = table.at_width(table_width(arch))
    removed = table.depth - arch.depth
    mixers = [*arch.mixers, *[REMOVED] * removed]
    chosen = pruned.mixers.loc[list(enumerate(arch.mixers))].reset_index(drop=True)
    chosen = pd.concat([chosen, pd.DataFrame({"macs": [0] * removed, "params": [0] * removed})], ignore_index=True)
    chosen["macs"] = [_mixer_macs(pruned, arch, i, mixer, macs) for i, (mixer, macs) in
                      enumerate(zip(mixers, chosen.macs, strict=True))]  # fmt: skip
    kept = pd.Series([len(b.mlp_kept) for b in arch.blocks] + [0] * removed, dtype="int64")
    mlp = pruned.mlp.reset_index(drop=True)
    mlp = pd.concat([mlp.iloc[: arch.depth], mlp.iloc[arch.depth :].assign(fixed_macs=0, fixed_params=0)])
    mlp = mlp.assign(hidden=table.mlp.hidden.to_numpy())  # each block's dense width, removed blocks included
    costs = pd.DataFrame(
        {
            "mixer": mixers,
            "kernel": pd.array([kernel_size(m) for m in mixers], dtype="Int64"),
            "mlp_kept": kept,
            "mlp_total": mlp.hidden,
            "mlp_ratio": kept / mlp.hidden,
            "mixer_macs": chosen.macs,
            "mlp_macs": mlp.fixed_macs + mlp.unit_macs * kept,
            "mixer_params": chosen.params,
            "mlp_params": mlp.fixed_params + mlp.unit_params * kept,
        }
    )
    for column in ("mixer_macs", "mlp_macs", "mixer_params", "mlp_params"):
        costs[f"dense_{column}"] = dense[column].to_numpy()
    costs.index.name = "block"
    return costs


def _mixer_macs(table: CostTable, arch: Architecture, block: int, mixer: str, macs: int) -> int:
    """Block `block`'s mixer MACs: an msa's by the extra rows the architecture selects, where it selects any."""
    rows = table.extra_msa.get(block, {})
    chosen = selected_rows(arch, rows) if mixer == DENSE_MIXER and rows else None
    return macs if chosen is None else sum(rows[c] for c in chosen)


ARCHITECTURE_COLUMNS = [
    "mixer",
    "kernel",
    "mlp_kept",
    "mlp_total",
    "mlp_ratio",
    "dense_macs",
    "macs",
    "dense_params",
    "params",
]


def architecture_table(arch: Architecture, table: CostTable | None) -> pd.DataFrame:
    """One row per block (index "0", "1", ...), then "fixed" (stem, tokens, norm, head) and "total".

    Columns: mixer, kernel, MLP units kept / total and their ratio, and MACs and params dense and pruned.
    Without a table (or one `arch` does not fit) only the choices are known: mixer, kernel, mlp_kept.
    """
    if table is None:
        blocks = pd.DataFrame(
            {
                "mixer": list(arch.mixers),
                "kernel": pd.array([kernel_size(m) for m in arch.mixers], dtype="Int64"),
                "mlp_kept": pd.array([len(b.mlp_kept) for b in arch.blocks], dtype="Int64"),
            }
        )
        total = pd.DataFrame({"mlp_kept": pd.array([blocks.mlp_kept.sum()], dtype="Int64")}, index=["total"])
        return _with_string_index(blocks, total)
    costs = block_costs(arch, table)
    blocks = costs[["mixer", "kernel", "mlp_kept", "mlp_total", "mlp_ratio"]].assign(
        dense_macs=costs.dense_mixer_macs + costs.dense_mlp_macs,
        macs=costs.mixer_macs + costs.mlp_macs,
        dense_params=costs.dense_mixer_params + costs.dense_mlp_params,
        params=costs.mixer_params + costs.mlp_params,
    )
    pruned = table.at_width(table_width(arch))
    fixed = pd.DataFrame(
        {
            "dense_macs": int(table.fixed.macs.sum()),
            "macs": int(pruned.fixed.macs.sum()),
            "dense_params": int(table.fixed.params.sum()),
            "params": int(pruned.fixed.params.sum()),
        },
        index=["fixed"],
    )
    counts = ["mlp_kept", "mlp_total", "dense_macs", "macs", "dense_params", "params"]
    sums = blocks[counts].sum() + fixed.reindex(columns=counts, fill_value=0).iloc[0]
    total = sums.to_frame("total").T.assign(mlp_ratio=sums.mlp_kept / sums.mlp_total)
    frame = _with_string_index(blocks, fixed, total)[ARCHITECTURE_COLUMNS]
    if pruned.latency is None:
        return frame
    # Predicted milliseconds per batch: each block's parts, the rest of the network, and the total corrected as the
    # table's end-to-end checks fitted it (so it is not the column's sum).
    dense = Architecture(arch.model, arch.img_size, arch.num_classes, tuple(
        BlockChoice("msa", tuple(range(h))) for h in table.mlp.hidden), dict(arch.extras), arch.skip_mixer)  # fmt: skip
    for column, chosen in (("dense_latency_ms", dense), ("latency_ms", arch)):
        parts = [pruned.latency.block(chosen, i) for i in range(chosen.depth)]
        frame[column] = [*parts, *[0.0] * (len(blocks) - len(parts)), pruned.latency.fixed_ms, pruned.latency(chosen)]
    return frame


def _with_string_index(blocks: pd.DataFrame, *extra_rows: pd.DataFrame) -> pd.DataFrame:
    blocks = blocks.set_axis([str(i) for i in range(len(blocks))])
    table = pd.concat([blocks, *extra_rows])
    for column in table.columns:
        if column not in ("mixer", "mlp_ratio"):
            table[column] = table[column].astype("Int64")  # counts stay exact integers next to the missing cells
    table.index.name = "block"
    return table

"""`LookupTable`: the MACs and parameters of every choice of a supernet's search space.

Costs are additive: a subnet costs the fixed part (stem, tokens, final norm, head) plus, per block,
its mixer's cost, the MLP branch's width-independent cost and a per-kept-unit cost times its width.

A supernet with choices outside its blocks records them in the header (`discrete_choices`: depths, widths,
head counts...). One with width choices is priced at each embedding width its family lists
(`Family.table_widths`), and a subnet of depth d costs the fixed part plus its first d blocks at its width.

A block applied several times per forward (a recursive family) costs the sum of its applications. A family whose
choices change the msa candidate's cost per pass adds extra msa rows per block (`Family.extra_msa_passes`); the
`msa` mixer row, their sum at the supernet's own choices, is what the gradient search prices. The file format
and how its rows select an architecture's costs are in `table_format`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from supernets import MIXERS, Architecture, BlockChoice
from supernets.family import Family, family_of, family_of_model_name
from supernets.io import atomic_write_text

from .counting import count_macs, count_macs_by_child, fixed_rows
from .latency import LatencyContext, TimerFn, measure_latency
from .spvit_formula import spvit_rows
from .table_format import (
    CHOICES,
    COLUMNS,
    EXTRA_MSA,
    FORMAT,
    FORMAT_VERSION,
    LATENCY_COLUMNS,
    LATENCY_HEADER,
    META_TYPES,
    SKIP_MIXER,
    WIDTH,
    LatencyPrediction,
    dearest_selection,
    latency_prediction,
    read_table_text,
    selected_rows,
    table_width,
)

CONVENTIONS = ("fvcore", "core", "spvit")


class LookupTable:
    """One row per block and choice (`item` mixer / mlp_fixed / mlp_unit, and a family's extra msa rows) plus the
    fixed costs, per width.

    `units` is the MLP hidden size on `mlp_unit` rows; block -1 holds the fixed costs, one row per part.
    The arrays below (what the gates' search prices) are those of the full width; a narrower width's are a
    table of their own.
    """

    def __init__(self, meta: dict[str, Any], frame: pd.DataFrame) -> None:
        # The constants of `differentiable_flops` (by device) and `differentiable_latency` (by ("latency", device)).
        self.device_costs: dict[Any, tuple[Any, ...]] = {}
        self.meta = {k: meta[k] for k in (*META_TYPES, CHOICES, SKIP_MIXER, LATENCY_HEADER) if k in meta}
        if self.meta["convention"] not in CONVENTIONS:
            raise ValueError(f"convention '{self.meta['convention']}': expected one of {', '.join(CONVENTIONS)}")
        if WIDTH not in frame.columns:
            frame = frame.assign(**{WIDTH: 0})
        latency = [c for c in LATENCY_COLUMNS if c in frame.columns]
        self._frame = frame[[*COLUMNS, WIDTH, *latency]].astype(
            {
                "block": int,
                "item": str,
                "choice": str,
                "macs": np.int64,
                "params": np.int64,
                "units": np.int64,
                WIDTH: np.int64,
                **dict.fromkeys(latency, np.float64),
            }
        )
        self._frame = self._frame.reset_index(drop=True)
        widths = sorted(set(self._frame[WIDTH].tolist()))
        self._rows = self._frame[self._frame[WIDTH] == widths[-1]]  # the full width
        fixed = self._rows[self._rows.block == -1]
        self.fixed_macs = int(fixed.macs.sum())
        self.fixed_params = int(fixed.params.sum())
        blocks = self._rows[self._rows.block >= 0]
        self.depth = int(blocks.block.max()) + 1
        mixers = blocks[blocks.item == "mixer"].pivot(index="block", columns="choice")
        self.mixer_macs = mixers.macs[list(MIXERS)].to_numpy(np.int64)  # (depth, 4), MIXERS order
        self.mixer_params = mixers.params[list(MIXERS)].to_numpy(np.int64)
        mlp_fixed = blocks[blocks.item == "mlp_fixed"].set_index("block").sort_index()
        mlp_unit = blocks[blocks.item == "mlp_unit"].set_index("block").sort_index()
        self.mlp_fixed_macs = mlp_fixed.macs.to_numpy(np.int64)  # (depth,)
        self.mlp_fixed_params = mlp_fixed.params.to_numpy(np.int64)
        self.mlp_unit_macs = mlp_unit.macs.to_numpy(np.int64)
        self.mlp_unit_params = mlp_unit.params.to_numpy(np.int64)
        self.mlp_hidden = mlp_unit.units.to_numpy(np.int64)
        # Per block, {choice: MACs} of its family's extra msa rows; empty for a family without any.
        self.extra_msa: dict[int, dict[str, int]] = {}
        for row in blocks[blocks.item == EXTRA_MSA].itertuples():
            self.extra_msa.setdefault(int(row.block), {})[row.choice] = int(row.macs)
        self._latency = latency_prediction(self.meta, self._rows)
        narrower = {w: LookupTable(self.meta, self._frame[self._frame[WIDTH] == w]) for w in widths[:-1]}
        self._by_width = narrower | {widths[-1]: self}

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def convention(self) -> str:
        return self.meta["convention"]

    @property
    def skip_mixer(self) -> str:
        """What the skip rows price: the identity (nothing) or the affine skip (its folded norm)."""
        return self.meta.get(SKIP_MIXER, "identity")

    @property
    def family(self) -> Family:
        return family_of_model_name(self.model)

    # -- pricing ----------------------------------------------------------------------------------

    def check(self, arch: Architecture) -> None:
        """Raise a `ValueError` if `arch` belongs to another model, image size or class count."""
        for field in ("model", "img_size", "num_classes"):
            if getattr(arch, field) != self.meta[field]:
                raise ValueError(
                    f"lookup table is for {self._describe()}, but the architecture has {field}="
                    f"{getattr(arch, field)!r}; rebuild the table with `spvit lut`"
                )
        arch.validate_for(
            model=self.model,
            img_size=self.meta["img_size"],
            num_classes=self.meta["num_classes"],
            mlp_hidden=self.mlp_hidden.tolist(),
            choices=self.meta.get(CHOICES),
        )
        if arch.skip_mixer != self.skip_mixer:
            raise ValueError(
                f"skip_mixer: the lookup table prices '{self.skip_mixer}' skips, the architecture has "
                f"'{arch.skip_mixer}'; rebuild the table with `spvit lut --skip-mixer {arch.skip_mixer}`"
            )
        if table_width(arch) not in self._by_width:
            raise ValueError(f"embed_dim: the lookup table prices widths {', '.join(map(str, self._by_width))} only")

    def check_supernet(self, net: nn.Module) -> None:
        """Raise a `ValueError` if this table was not built for `net`'s model, size and settings."""
        # As JSON, as the table stores it: a supernet built with tuple arguments (e.g. heads=(1, 2, 4)) matches the
        # lists a saved table reads back.
        config = json.loads(json.dumps(net.config()))
        for field in ("model", "img_size", "num_classes", "model_kwargs"):
            if config[field] != self.meta[field]:
                raise ValueError(
                    f"lookup table is for {self._describe()}, but the supernet has {field}={config[field]!r}; "
                    f"rebuild the table with `spvit lut`"
                )
        if net.gate_config.skip_mixer != self.skip_mixer:
            raise ValueError(
                f"lookup table prices '{self.skip_mixer}' skips, the supernet's are "
                f"'{net.gate_config.skip_mixer}'; rebuild the table with `spvit lut`"
            )
        if net.mlp_hidden != self.mlp_hidden.tolist():
            raise ValueError(f"lookup table blocks do not match the supernet's ({self._describe()})")

    def flops(self, arch: Architecture) -> int:
        """MACs of `arch` in this table's convention."""
        self.check(arch)
        table, mixers, units = self._choices(arch)
        d = arch.depth
        per_block = table._mixer_macs(arch, mixers) + table.mlp_fixed_macs[:d] + table.mlp_unit_macs[:d] * units
        return table.fixed_macs + int(per_block.sum())

    @property
    def latency_prediction(self) -> LatencyPrediction | None:
        """The latency model of the full width (its parts, MLP curves and correction); None without latency."""
        return self._latency

    @property
    def latency_context(self) -> LatencyContext | None:
        """What the latency columns were measured on; None in a table without them."""
        if self._latency is None:
            return None
        header = self.meta[LATENCY_HEADER]
        return LatencyContext(**{f: header[f] for f in LatencyContext.__dataclass_fields__})

    def latency(self, arch: Architecture, context: LatencyContext | None = None) -> float:
        """Predicted milliseconds of `arch`'s exported subnet per batch, in the context the table was measured in
        (`context`, when given, must be that one)."""
        self.check(arch)
        if self._latency is None:
            raise ValueError("this lookup table has no latency columns; measure one with `spvit lut --latency`")
        if context is not None:
            self.latency_context.check_matches(context)
        return self._by_width[table_width(arch)]._latency(arch)

    def latency_range(self, full_size: bool = False) -> tuple[float, float]:
        """(min, max) predicted ms over the search space, as `range` prices MACs: the fastest subnet (every
        mixer at its fastest, every MLP empty, at any depth and width) and the slowest (every block at its slowest
        mixer, and the msa at its family's slowest choices, with its MLP at the slowest point of its curve).
        `full_size` keeps to the full depth and width and the supernet's own choices."""
        if self._latency is None:
            raise ValueError("this lookup table has no latency columns; measure one with `spvit lut --latency`")
        depths = [self.depth] if full_size else self.meta.get(CHOICES, {}).get("depth", [self.depth])
        tables = [self] if full_size else self._by_width.values()

        def fastest(p: LatencyPrediction, depth: int) -> float:
            blocks = p.mixer_table().min(1)[:depth].sum() + sum(p.curves[i][0, 1] for i in range(depth))
            return p.scale * (p.fixed_ms + blocks) + p.offset

        low = min(fastest(t._latency, d) for t in tables for d in depths)
        p = self._latency
        mixers = p.mixer_table()
        if not full_size:
            mixers[:, MIXERS.index("msa")] = p.dearest_msa()
        slowest = mixers.max(1).sum() + sum(p.curves[i][:, 1].max() for i in range(self.depth))
        return low, p.scale * (p.fixed_ms + slowest) + p.offset

    def params(self, arch: Architecture) -> int:
        """Parameters `arch` needs as searched (a conv keeps v, proj, z and its BN; gates are not counted)."""
        self.check(arch)
        table, mixers, units = self._choices(arch)
        d = arch.depth
        per_block = (
            table.mixer_params[np.arange(d), mixers] + table.mlp_fixed_params[:d] + table.mlp_unit_params[:d] * units
        )
        return table.fixed_params + int(per_block.sum())

    def range(self, full_size: bool = False) -> tuple[int, int]:
        """(min, max) MACs over the whole search space: every depth, width and family choice the supernet offers,
        every mixer and MLP width. `full_size` keeps to its full depth and width and its own family choices, all
        that its gates choose between."""
        depths = [self.depth] if full_size else self.meta.get(CHOICES, {}).get("depth", [self.depth])
        tables = [self] if full_size else self._by_width.values()
        # The cheapest subnet of depth d at a width: every mixer at its cheapest, every MLP empty. (Skip costs
        # nothing, so the extra msa rows do not change it.)
        low = min(
            t.fixed_macs + int((t.mlp_fixed_macs + t.mixer_macs.min(axis=1))[:d].sum()) for t in tables for d in depths
        )
        mixer_max = self.mixer_macs.max(axis=1)
        if not full_size:  # msa at its dearest family choices
            for block, rows in self.extra_msa.items():
                mixer_max[block] = max(mixer_max[block], dearest_selection(rows))
        base = self.fixed_macs + int(self.mlp_fixed_macs.sum())
        high = base + int(mixer_max.sum() + (self.mlp_unit_macs * self.mlp_hidden).sum())
        return low, high

    def dense_flops(self) -> int:
        """MACs of the dense architecture (every mixer msa, every hidden unit kept)."""
        msa = MIXERS.index("msa")
        per_block = self.mixer_macs[:, msa] + self.mlp_fixed_macs + self.mlp_unit_macs * self.mlp_hidden
        return self.fixed_macs + int(per_block.sum())

    def _mixer_macs(self, arch: Architecture, mixers: np.ndarray) -> np.ndarray:
        """Per block, the MACs of its mixer (indices into MIXERS); an msa block by the extra msa rows its family
        picks for the architecture, where it picks any."""
        macs = self.mixer_macs[np.arange(arch.depth), mixers]
        for block in np.flatnonzero(mixers == MIXERS.index("msa")):
            rows = self.extra_msa.get(int(block), {})
            chosen = selected_rows(arch, rows) if rows else None
            if chosen is not None:
                macs[block] = sum(rows[c] for c in chosen)
        return macs

    def _choices(self, arch: Architecture) -> tuple[LookupTable, np.ndarray, np.ndarray]:
        """The table of `arch`'s width, and per block its mixer's index and its number of kept hidden units."""
        mixers = np.array([MIXERS.index(b.mixer) for b in arch.blocks])
        units = np.array([len(b.mlp_kept) for b in arch.blocks], dtype=np.int64)
        return self._by_width[table_width(arch)], mixers, units

    def _describe(self) -> str:
        m = self.meta
        kwargs = f" {m['model_kwargs']}" if m["model_kwargs"] else ""
        return f"{m['model']}{kwargs} at img_size {m['img_size']} with {m['num_classes']} classes"

    # -- data -------------------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        return self._frame.copy()

    def summary(self) -> pd.DataFrame:
        """Per block at the full embedding width: MACs (M) of every mixer and of the full-width MLP, the per-unit
        MACs and the width."""
        blocks = self._rows[self._rows.block >= 0]
        table = (blocks[blocks.item == "mixer"].pivot(index="block", columns="choice", values="macs") / 1e6).round(3)
        table = table[list(reversed(MIXERS))]
        table["mlp_full"] = ((self.mlp_fixed_macs + self.mlp_unit_macs * self.mlp_hidden) / 1e6).round(3)
        table["mlp_per_unit"] = self.mlp_unit_macs
        table["hidden"] = self.mlp_hidden
        return table

    def save(self, path: str | os.PathLike) -> None:
        """CSV with one leading `#` line of JSON metadata; written atomically."""
        header = {"format": FORMAT, "version": FORMAT_VERSION, **self.meta}
        atomic_write_text(path, f"# {json.dumps(header)}\n" + self._frame.to_csv(index=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LookupTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lookup table not found: {path}")
        try:
            table = cls(*read_table_text(path.read_text(encoding="utf-8")))
            if not table.depth == len(table.mixer_macs) == len(table.mlp_fixed_macs) == len(table.mlp_hidden):
                raise ValueError(f"every one of the {table.depth} blocks needs its mixer, mlp_fixed and mlp_unit rows")
            if table.extra_msa and sorted(table.extra_msa) != list(range(table.depth)):
                raise ValueError(f"every one of the {table.depth} blocks needs its {EXTRA_MSA} rows")
            return table
        except (ValueError, KeyError, TypeError, pd.errors.ParserError) as e:
            raise ValueError(f"{path} is not a valid lookup table: {e}") from None


def build_lookup_table(net: nn.Module, convention: str = "fvcore") -> LookupTable:
    """Price every choice of `net`'s search space: measured by fvcore, or by the SPViT formula. A supernet on a GPU
    is counted on a CPU copy: the counts depend on shapes alone, and the probe inputs below are made on the CPU."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention '{convention}'; expected one of {', '.join(CONVENTIONS)}")
    if any(p.device.type not in ("cpu", "meta") for p in net.parameters()):
        net = copy.deepcopy(net).cpu()
    meta = {k: v for k, v in net.config().items() if k in META_TYPES} | {"convention": convention}
    if net.gate_config.skip_mixer != "identity":
        meta[SKIP_MIXER] = net.gate_config.skip_mixer
    if choices := net.discrete_choices():
        meta[CHOICES] = choices
    family = family_of(net)
    if convention == "spvit":
        rows = spvit_rows(net)
    else:
        rows = [
            row | {WIDTH: w} for w in family.table_widths(net) for row in _measured_rows(net, family, convention, w)
        ]
    for row in rows:
        row.setdefault("units", 0)
        row.setdefault(WIDTH, 0)
    return LookupTable(meta, pd.DataFrame(rows, columns=[*COLUMNS, WIDTH]))


def build_latency_table(
    net: nn.Module,
    export: Callable[[Architecture], nn.Module],
    context: LatencyContext,
    timer: TimerFn,
    convention: str = "fvcore",
    mlp_points: int = 32,
    checks: int = 8,
) -> LookupTable:
    """`build_lookup_table(net, convention)` with every choice's latency measured by `timer` on `net`'s device in
    `context` (see `lookup_tables.latency`); `export(arch)` builds the plain subnet the timings run."""
    table = build_lookup_table(net, convention)
    family = family_of(net)
    shapes = {w: _block_input_shapes(net, family.smallest_architecture(net, w)) for w in family.table_widths(net)}
    rows, header = measure_latency(net, table.to_frame().to_dict("records"), shapes, export, context, timer,
                                   mlp_points, checks)  # fmt: skip
    return LookupTable(table.meta | {LATENCY_HEADER: header}, pd.DataFrame(rows))


def _measured_rows(net: nn.Module, family: Family, convention: str, embed_dim: int) -> list[dict[str, Any]]:
    """The rows of embedding width `embed_dim` (0: the supernet's only one), measured by fvcore."""
    smallest = _smallest_architecture(net, family, embed_dim)
    block_inputs = _block_input_shapes(net, smallest)
    with _fixed(net, smallest):
        # Every mixer skipped and every MLP empty: what remains outside the blocks is the fixed cost.
        with torch.no_grad():
            by_child = count_macs_by_child(net, _image(net), convention=convention)
        empty_blocks = by_child.pop("blocks")
        rows = fixed_rows(net, by_child)  # with `smallest` fixed: the parts outside the blocks at its width
        for i, (block, shape) in enumerate(zip(net.blocks, block_inputs, strict=True)):
            x = torch.zeros(shape)
            passes = net.block_passes(i)  # each application of the block costs its own
            mixer_macs: dict[str, int] = {}
            for mixer in MIXERS:
                block.attn.fixed_mixer = mixer
                branches = [_Branch(block, "mixer_branch", kw) for kw in passes] if block.attn.has_branch(mixer) else []
                mixer_macs[mixer] = sum(_measure(branch, x, convention) for branch in branches)
                params = sum(p.numel() for p in block.mixer_parameters(mixer, x.shape[-1]))
                rows.append(dict(block=i, item="mixer", choice=mixer, macs=mixer_macs[mixer], params=params))
            rows += _extra_msa_rows(net, family, i, x, convention, mixer_macs["msa"])
            hidden = block.mlp.hidden_features
            mlp_at = {}
            for width in (0, 1, hidden):
                block.mlp.fixed_kept = torch.arange(width)
                # The MLP branch takes nothing from the pass: every application costs the same.
                mlp_at[width] = len(passes) * _measure(_Branch(block, "mlp_branch"), x, convention)
            per_unit = mlp_at[1] - mlp_at[0]
            if mlp_at[hidden] != mlp_at[0] + hidden * per_unit:
                raise RuntimeError(f"block {i}: MLP MACs are not linear in the kept width: {mlp_at}")
            fixed_params, unit_params = block.mlp_parameter_counts(x.shape[-1])
            rows.append(dict(block=i, item="mlp_fixed", choice="", macs=mlp_at[0], params=fixed_params))
            rows.append(dict(block=i, item="mlp_unit", choice="", macs=per_unit, params=unit_params, units=hidden))
            empty_blocks -= mlp_at[0] + mixer_macs["skip"]  # an affine skip's norm stays in an empty block
    if empty_blocks != 0:
        raise RuntimeError(f"block costs are not additive: {empty_blocks} MACs of the empty blocks are unaccounted for")
    return rows


def _extra_msa_rows(
    net: nn.Module, family: Family, i: int, x: torch.Tensor, convention: str, msa_macs: int
) -> list[dict[str, Any]]:
    """The family's extra msa rows of block i (input x), each pass measured with the msa mixer fixed; their sum at
    the supernet's own pass arguments must be the msa row's."""
    block, passes = net.blocks[i], net.block_passes(i)
    block.attn.fixed_mixer = "msa"
    rows, own = [], 0
    for choice, step, kwargs in family.extra_msa_passes(net, i):
        macs = _measure(_Branch(block, "mixer_branch", kwargs), x, convention)
        rows.append(dict(block=i, item=EXTRA_MSA, choice=choice, macs=macs, params=0))
        own += macs if kwargs == passes[step] else 0
    if rows and own != msa_macs:
        raise RuntimeError(f"block {i}: msa costs {msa_macs} MACs, but its passes {own} at the same choices")
    return rows


class _Branch(nn.Module):
    """One branch of a block as a module of its own, with the keyword arguments of one pass, so fvcore can trace it
    alone."""

    def __init__(self, block: nn.Module, branch: str, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.block = block
        self.branch = branch
        self.kwargs = kwargs or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.block, self.branch)(x, **self.kwargs)


def _measure(module: nn.Module, x: torch.Tensor, convention: str) -> int:
    with torch.no_grad():
        return count_macs(module, x, convention=convention)


def _image(net: nn.Module) -> torch.Tensor:
    return torch.zeros(1, net.in_chans, net.img_size, net.img_size)


def _block_input_shapes(net: nn.Module, arch: Architecture) -> list[tuple[int, ...]]:
    """The token tensor shape each block sees for one image with `arch` fixed, recorded from a real forward (at its
    first application: a block applied again, by a recursive family, sees tokens of the same shape)."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(block: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes.setdefault(block, tuple(args[0].shape))

    hooks = [b.register_forward_pre_hook(record) for b in net.blocks]
    try:
        with _fixed(net, arch), torch.no_grad():
            net(_image(net))
    finally:
        for h in hooks:
            h.remove()
    return [shapes[b] for b in net.blocks]


def _smallest_architecture(net: nn.Module, family: Family, embed_dim: int) -> Architecture:
    """Every mixer skipped and every MLP empty, at full depth and embedding width `embed_dim` (0: the only one)."""
    dense = family.smallest_architecture(net, embed_dim)
    return dataclasses.replace(dense, blocks=tuple(BlockChoice("skip", ()) for _ in dense.blocks))


@contextmanager
def _fixed(net: nn.Module, arch: Architecture) -> Iterator[None]:
    """Fix `arch` in eval mode for the duration, then restore the supernet's mode and architecture."""
    previous, training = net.fixed_architecture, net.training
    net.eval()
    net.fix_architecture(arch)
    try:
        yield
    finally:
        net.release_architecture()
        if previous is not None:
            net.fix_architecture(previous)
        net.train(training)

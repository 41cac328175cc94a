"""`LookupTable`: the MACs and parameters of every choice of a supernet's search space.

Costs are additive: a subnet costs the fixed part (stem, tokens, final norm, head) plus, per block,
its mixer's cost, the MLP branch's width-independent cost and a per-kept-unit cost times its width.

A supernet with depth and width choices (T2T-ViT) is priced at each embedding width it offers: the `width`
column names the width of a row (0 in a table of one width, and in tables written before the column was),
and a subnet of depth d costs the fixed part plus its first d blocks at its width. The header then records
the supernet's `discrete_choices` (depths, widths, head counts).

A block applied several times per forward (SReT's recursion) costs the sum of its applications. SReT's group
splits change the msa candidate's attention matmuls (÷G), so a block's msa is also priced per pass and group
count: `msa_groups` rows, whose choice `groups[s][p]=G` names the entry of `Architecture.groups` they price.
An architecture with groups costs, per msa block, the sum of its passes' rows at its group counts; the `msa`
mixer row, the same sum at the supernet's own group counts, is what the gradient search prices.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from supernets import MIXERS, Architecture, BlockChoice
from supernets.architecture import check_type
from supernets.io import atomic_write_text
from supernets.vit import input_channels

from .counting import count_macs, count_macs_by_child, fixed_rows
from .spvit_formula import spvit_rows

CONVENTIONS = ("fvcore", "core", "spvit")
FORMAT = "spvit-search lookup table"
FORMAT_VERSION = 1
COLUMNS = ["block", "item", "choice", "macs", "params", "units"]
_META_FIELDS = ("model", "img_size", "num_classes", "model_kwargs", "convention")
_META_TYPES = {"model": str, "img_size": int, "num_classes": int, "model_kwargs": dict, "convention": str}
CHOICES = "discrete_choices"  # the optional header field of a supernet with depth and width choices
WIDTH = "width"  # the optional column: the embedding width a row prices (0: the supernet's only one)
MSA_GROUPS = "msa_groups"  # the `item` of a row that prices one pass of a block's msa at one group count (SReT)
_GROUP_CHOICE = re.compile(r"groups\[(\d+)\]\[(\d+)\]=(\d+)")  # an msa_groups row's `choice`: stage, pass, G


class LookupTable:
    """One row per block and choice (`item` mixer / mlp_fixed / mlp_unit, and msa_groups for SReT) plus the fixed
    costs, per width.

    `units` is the MLP hidden size on `mlp_unit` rows; block -1 holds the fixed costs, one row per part.
    The arrays below (what the gates' search prices) are those of the full width; a narrower width's are a
    table of their own.
    """

    def __init__(self, meta: dict[str, Any], frame: pd.DataFrame) -> None:
        self.device_costs: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # `differentiable_flops`' constants
        self.meta = {k: meta[k] for k in (*_META_FIELDS, CHOICES) if k in meta}
        if self.meta["convention"] not in CONVENTIONS:
            raise ValueError(f"convention '{self.meta['convention']}': expected one of {', '.join(CONVENTIONS)}")
        if WIDTH not in frame.columns:
            frame = frame.assign(**{WIDTH: 0})
        self._frame = frame[[*COLUMNS, WIDTH]].astype(
            {
                "block": int,
                "item": str,
                "choice": str,
                "macs": np.int64,
                "params": np.int64,
                "units": np.int64,
                WIDTH: np.int64,
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
        # SReT: per block, {(stage, pass): {G: MACs of that pass's msa with G groups}}; empty for other families.
        self.msa_by_groups: dict[int, dict[tuple[int, int], dict[int, int]]] = {}
        for row in blocks[blocks.item == MSA_GROUPS].itertuples():
            match = _GROUP_CHOICE.fullmatch(row.choice)
            if match is None:
                raise ValueError(f"block {row.block}: {MSA_GROUPS} choice '{row.choice}' is not groups[s][p]=G")
            stage, step, groups = map(int, match.groups())
            self.msa_by_groups.setdefault(int(row.block), {}).setdefault((stage, step), {})[groups] = int(row.macs)
        narrower = {w: LookupTable(self.meta, self._frame[self._frame[WIDTH] == w]) for w in widths[:-1]}
        self._by_width = narrower | {widths[-1]: self}

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def convention(self) -> str:
        return self.meta["convention"]

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
        if (arch.embed_dim or 0) not in self._by_width:
            raise ValueError(f"embed_dim: the lookup table prices widths {', '.join(map(str, self._by_width))} only")

    def check_supernet(self, net: nn.Module) -> None:
        """Raise a `ValueError` if this table was not built for `net`'s model, size and settings."""
        # As JSON, as the table stores it: a supernet built with tuple arguments (SReT's heads=(1, 2, 4)) matches the
        # lists a saved table reads back.
        config = json.loads(json.dumps(net.config()))
        for field in ("model", "img_size", "num_classes", "model_kwargs"):
            if config[field] != self.meta[field]:
                raise ValueError(
                    f"lookup table is for {self._describe()}, but the supernet has {field}={config[field]!r}; "
                    f"rebuild the table with `spvit lut`"
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
        """(min, max) MACs over the whole search space: every depth, width and group split the supernet offers,
        every mixer and MLP width. `full_size` keeps to its full depth and width and its own group splits, all that
        its gates choose between."""
        depths = [self.depth] if full_size else self.meta.get(CHOICES, {}).get("depth", [self.depth])
        tables = [self] if full_size else self._by_width.values()
        # The cheapest subnet of depth d at a width: every mixer at its cheapest, every MLP empty. (Skip costs
        # nothing, so the group splits do not change it.)
        low = min(
            t.fixed_macs + int((t.mlp_fixed_macs + t.mixer_macs.min(axis=1))[:d].sum()) for t in tables for d in depths
        )
        mixer_max = self.mixer_macs.max(axis=1)
        if not full_size:  # msa at its dearest group splits, every pass at its fewest groups
            for block, passes in self.msa_by_groups.items():
                mixer_max[block] = max(mixer_max[block], sum(max(by_g.values()) for by_g in passes.values()))
        base = self.fixed_macs + int(self.mlp_fixed_macs.sum())
        high = base + int(mixer_max.sum() + (self.mlp_unit_macs * self.mlp_hidden).sum())
        return low, high

    def dense_flops(self) -> int:
        """MACs of the dense architecture (every mixer msa, every hidden unit kept)."""
        msa = MIXERS.index("msa")
        per_block = self.mixer_macs[:, msa] + self.mlp_fixed_macs + self.mlp_unit_macs * self.mlp_hidden
        return self.fixed_macs + int(per_block.sum())

    def _mixer_macs(self, arch: Architecture, mixers: np.ndarray) -> np.ndarray:
        """Per block, the MACs of its mixer (indices into MIXERS); an msa block at the architecture's group splits."""
        macs = self.mixer_macs[np.arange(arch.depth), mixers]
        if arch.groups is None:
            return macs
        msa = MIXERS.index("msa")
        for block in np.flatnonzero(mixers == msa):
            passes = self.msa_by_groups[int(block)]
            macs[block] = sum(by_g[arch.groups[s][p]] for (s, p), by_g in passes.items())
        return macs

    def _choices(self, arch: Architecture) -> tuple[LookupTable, np.ndarray, np.ndarray]:
        """The table of `arch`'s width, and per block its mixer's index and its number of kept hidden units."""
        mixers = np.array([MIXERS.index(b.mixer) for b in arch.blocks])
        units = np.array([len(b.mlp_kept) for b in arch.blocks], dtype=np.int64)
        return self._by_width[arch.embed_dim or 0], mixers, units

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
            first, _, body = path.read_text(encoding="utf-8").partition("\n")
            meta = json.loads(first.removeprefix("#").strip())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a lookup table header")
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')} is not {FORMAT_VERSION}")
            frame = pd.read_csv(io.StringIO(body), keep_default_na=False)
            for name, expected in _META_TYPES.items():
                if name not in meta:
                    raise ValueError(f"header: {name}: required field is missing")
                check_type(f"header: {name}", meta[name], expected)
            check_type(f"header: {CHOICES}", meta.get(CHOICES, {}), dict)
            for name, values in meta.get(CHOICES, {}).items():
                check_type(f"header: {CHOICES}.{name}", values, list)
            missing = sorted(set(COLUMNS) - set(frame.columns))
            if missing:
                raise ValueError(f"missing columns {missing}")
            table = cls(meta, frame)
            if (table._frame[["macs", "params", "units"]] < 0).any().any():
                raise ValueError("costs must not be negative")
            if not table.depth == len(table.mixer_macs) == len(table.mlp_fixed_macs) == len(table.mlp_hidden):
                raise ValueError(f"every one of the {table.depth} blocks needs its mixer, mlp_fixed and mlp_unit rows")
            if "groups" in meta.get(CHOICES, {}) and sorted(table.msa_by_groups) != list(range(table.depth)):
                raise ValueError(f"every one of the {table.depth} blocks needs its {MSA_GROUPS} rows")
            return table
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, pd.errors.ParserError) as e:
            raise ValueError(f"{path} is not a valid lookup table: {e}") from None


def build_lookup_table(net: nn.Module, convention: str = "fvcore") -> LookupTable:
    """Price every choice of `net`'s search space: measured by fvcore, or by the SPViT formula. A supernet on a GPU
    is counted on a CPU copy: the counts depend on shapes alone, and the probe inputs below are made on the CPU."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention '{convention}'; expected one of {', '.join(CONVENTIONS)}")
    if any(p.device.type not in ("cpu", "meta") for p in net.parameters()):
        net = copy.deepcopy(net).cpu()
    meta = {k: v for k, v in net.config().items() if k in _META_FIELDS} | {"convention": convention}
    if hasattr(net, CHOICES):  # depth and width choices without gates (T2T-ViT)
        meta[CHOICES] = net.discrete_choices()
    widths = meta.get(CHOICES, {}).get("embed_dim", [0])
    if convention == "spvit":
        rows = spvit_rows(net)
    else:
        rows = [row | {WIDTH: w} for w in widths for row in _measured_rows(net, convention, w)]
    for row in rows:
        row.setdefault("units", 0)
        row.setdefault(WIDTH, 0)
    return LookupTable(meta, pd.DataFrame(rows, columns=[*COLUMNS, WIDTH]))


def _measured_rows(net: nn.Module, convention: str, embed_dim: int) -> list[dict[str, Any]]:
    """The rows of embedding width `embed_dim` (0: the supernet's only one), measured by fvcore."""
    smallest = _smallest_architecture(net, embed_dim)
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
                branches = [] if mixer == "skip" else [_Branch(block, "mixer_branch", kw) for kw in passes]
                mixer_macs[mixer] = sum(_measure(branch, x, convention) for branch in branches)
                params = sum(p.numel() for p in block.mixer_parameters(mixer, x.shape[-1]))
                rows.append(dict(block=i, item="mixer", choice=mixer, macs=mixer_macs[mixer], params=params))
            rows += _msa_group_rows(net, i, x, convention, mixer_macs["msa"])
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
            empty_blocks -= mlp_at[0]
    if empty_blocks != 0:
        raise RuntimeError(f"block costs are not additive: {empty_blocks} MACs of the empty blocks are unaccounted for")
    return rows


def _msa_group_rows(net: nn.Module, i: int, x: torch.Tensor, convention: str, msa_macs: int) -> list[dict[str, Any]]:
    """SReT: the `msa_groups` rows of block i (input x), its msa on each pass at every group count the pass offers;
    none for a supernet without group choices. `msa_macs`, the block's msa row, must be their sum at its groups."""
    offered = getattr(net, CHOICES)().get("groups") if hasattr(net, CHOICES) else None
    if offered is None:
        return []
    stage, block = net.block_stages[i], net.blocks[i]
    block.attn.fixed_mixer = "msa"
    rows, own = [], 0
    for step, (options, kw) in enumerate(zip(offered[stage], net.block_passes(i), strict=True)):
        for groups in options:
            macs = _measure(_Branch(block, "mixer_branch", kw | {"groups": groups}), x, convention)
            rows.append(dict(block=i, item=MSA_GROUPS, choice=f"groups[{stage}][{step}]={groups}", macs=macs, params=0))
            own += macs if groups == kw["groups"] else 0
    if own != msa_macs:
        raise RuntimeError(f"block {i}: msa costs {msa_macs} MACs, but its passes {own} at the same group counts")
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
    return torch.zeros(1, input_channels(net), net.img_size, net.img_size)


def _block_input_shapes(net: nn.Module, arch: Architecture) -> list[tuple[int, ...]]:
    """The token tensor shape each block sees for one image with `arch` fixed, recorded from a real forward (at its
    first application: a block applied again, SReT's recursion, sees tokens of the same shape)."""
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


def _smallest_architecture(net: nn.Module, embed_dim: int) -> Architecture:
    """Every mixer skipped and every MLP empty, at full depth and embedding width `embed_dim` (0: the only one)."""
    dense = net.dense_architecture(embed_dim) if embed_dim else net.dense_architecture()
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

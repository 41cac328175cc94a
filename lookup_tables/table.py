"""`LookupTable`: the MACs and parameters of every choice of a supernet's search space.

Costs are additive: a subnet costs the fixed part (stem, tokens, final norm, head) plus, per block,
its mixer's cost, the MLP branch's width-independent cost and a per-kept-unit cost times its width.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from supernets import MIXERS, Architecture, BlockChoice
from supernets.io import atomic_write_text

from .counting import count_macs, count_macs_by_child, fixed_rows
from .spvit_formula import spvit_rows

CONVENTIONS = ("fvcore", "core", "spvit")
FORMAT = "spvit-search lookup table"
FORMAT_VERSION = 1
COLUMNS = ["block", "item", "choice", "macs", "params", "units"]
_META_FIELDS = ("model", "img_size", "num_classes", "model_kwargs", "convention")


class LookupTable:
    """One row per block and choice (`item` mixer / mlp_fixed / mlp_unit) plus the fixed costs.

    `units` is the MLP hidden size on `mlp_unit` rows; block -1 holds the fixed costs, one row per part.
    """

    def __init__(self, meta: dict[str, Any], frame: pd.DataFrame) -> None:
        self.meta = {k: meta[k] for k in _META_FIELDS}
        if self.meta["convention"] not in CONVENTIONS:
            raise ValueError(f"convention '{self.meta['convention']}': expected one of {', '.join(CONVENTIONS)}")
        self._frame = frame[COLUMNS].astype(
            {"block": int, "item": str, "choice": str, "macs": np.int64, "params": np.int64, "units": np.int64}
        )
        self._frame = self._frame.reset_index(drop=True)
        fixed = self._frame[self._frame.block == -1]
        self.fixed_macs = int(fixed.macs.sum())
        self.fixed_params = int(fixed.params.sum())
        blocks = self._frame[self._frame.block >= 0]
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
        )

    def check_supernet(self, net: nn.Module) -> None:
        """Raise a `ValueError` if this table was not built for `net`'s model, size and settings."""
        config = net.config()
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
        mixers, widths = self._choices(arch)
        per_block = self.mixer_macs[np.arange(self.depth), mixers] + self.mlp_fixed_macs + self.mlp_unit_macs * widths
        return self.fixed_macs + int(per_block.sum())

    def params(self, arch: Architecture) -> int:
        """Parameters `arch` needs as searched (a conv keeps v, proj, z and its BN; gates are not counted)."""
        self.check(arch)
        mixers, widths = self._choices(arch)
        per_block = (
            self.mixer_params[np.arange(self.depth), mixers] + self.mlp_fixed_params + self.mlp_unit_params * widths
        )
        return self.fixed_params + int(per_block.sum())

    def range(self) -> tuple[int, int]:
        """(min, max) MACs over the whole search space."""
        base = self.fixed_macs + int(self.mlp_fixed_macs.sum())
        low = base + int(self.mixer_macs.min(axis=1).sum())
        high = base + int(self.mixer_macs.max(axis=1).sum() + (self.mlp_unit_macs * self.mlp_hidden).sum())
        return low, high

    def dense_flops(self) -> int:
        """MACs of the dense architecture (every mixer msa, every hidden unit kept)."""
        msa = MIXERS.index("msa")
        per_block = self.mixer_macs[:, msa] + self.mlp_fixed_macs + self.mlp_unit_macs * self.mlp_hidden
        return self.fixed_macs + int(per_block.sum())

    def _choices(self, arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
        mixers = np.array([MIXERS.index(b.mixer) for b in arch.blocks])
        widths = np.array([len(b.mlp_kept) for b in arch.blocks], dtype=np.int64)
        return mixers, widths

    def _describe(self) -> str:
        m = self.meta
        kwargs = f" {m['model_kwargs']}" if m["model_kwargs"] else ""
        return f"{m['model']}{kwargs} at img_size {m['img_size']} with {m['num_classes']} classes"

    # -- data -------------------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        return self._frame.copy()

    def summary(self) -> pd.DataFrame:
        """Per block: MACs (M) of every mixer and of the full-width MLP, the per-unit MACs and the width."""
        blocks = self._frame[self._frame.block >= 0]
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
        text = path.read_text(encoding="utf-8")
        first, _, body = text.partition("\n")
        try:
            meta = json.loads(first.removeprefix("#").strip())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a lookup table header")
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')} is not {FORMAT_VERSION}")
            frame = pd.read_csv(io.StringIO(body), keep_default_na=False)
            missing = sorted(set(COLUMNS) - set(frame.columns))
            if missing:
                raise ValueError(f"missing columns {missing}")
            return cls(meta, frame)
        except (ValueError, KeyError, json.JSONDecodeError, pd.errors.ParserError) as e:
            raise ValueError(f"{path} is not a valid lookup table: {e}") from None


def build_lookup_table(net: nn.Module, convention: str = "fvcore") -> LookupTable:
    """Price every choice of `net`'s search space: measured by fvcore, or by the SPViT formula."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention '{convention}'; expected one of {', '.join(CONVENTIONS)}")
    meta = {k: v for k, v in net.config().items() if k in _META_FIELDS} | {"convention": convention}
    rows = spvit_rows(net) if convention == "spvit" else _measured_rows(net, convention)
    for row in rows:
        row.setdefault("units", 0)
    return LookupTable(meta, pd.DataFrame(rows, columns=COLUMNS))


def _measured_rows(net: nn.Module, convention: str) -> list[dict[str, Any]]:
    rows = []
    block_inputs = _block_input_shapes(net)
    with _fixed(net, _smallest_architecture(net)):
        # Every mixer skipped and every MLP empty: what remains outside the blocks is the fixed cost.
        with torch.no_grad():
            by_child = count_macs_by_child(net, _image(net), convention=convention)
        empty_blocks = by_child.pop("blocks")
        for i, (block, shape) in enumerate(zip(net.blocks, block_inputs, strict=True)):
            x = torch.zeros(shape)
            for mixer in MIXERS:
                block.attn.fixed_mixer = mixer
                macs = 0 if mixer == "skip" else _measure(_Branch(block, "mixer_branch"), x, convention)
                params = sum(p.numel() for p in block.mixer_parameters(mixer))
                rows.append(dict(block=i, item="mixer", choice=mixer, macs=macs, params=params))
            hidden = block.mlp.hidden_features
            mlp_at = {}
            for width in (0, 1, hidden):
                block.mlp.fixed_kept = torch.arange(width)
                mlp_at[width] = _measure(_Branch(block, "mlp_branch"), x, convention)
            per_unit = mlp_at[1] - mlp_at[0]
            if mlp_at[hidden] != mlp_at[0] + hidden * per_unit:
                raise RuntimeError(f"block {i}: MLP MACs are not linear in the kept width: {mlp_at}")
            fixed_params, unit_params = block.mlp_parameter_counts()
            rows.append(dict(block=i, item="mlp_fixed", choice="", macs=mlp_at[0], params=fixed_params))
            rows.append(dict(block=i, item="mlp_unit", choice="", macs=per_unit, params=unit_params, units=hidden))
            empty_blocks -= mlp_at[0]
    if empty_blocks != 0:
        raise RuntimeError(f"block costs are not additive: {empty_blocks} MACs of the empty blocks are unaccounted for")
    return fixed_rows(net, by_child) + rows


class _Branch(nn.Module):
    """One branch of a block as a module of its own, so fvcore can trace it alone."""

    def __init__(self, block: nn.Module, branch: str) -> None:
        super().__init__()
        self.block = block
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.block, self.branch)(x)


def _measure(module: nn.Module, x: torch.Tensor, convention: str) -> int:
    with torch.no_grad():
        return count_macs(module, x, convention=convention)


def _image(net: nn.Module) -> torch.Tensor:
    in_chans = net.patch_embed.proj.in_channels
    return torch.zeros(1, in_chans, net.img_size, net.img_size)


def _block_input_shapes(net: nn.Module) -> list[tuple[int, ...]]:
    """The token tensor shape each block sees for one image, recorded from a real forward."""
    shapes: list[tuple[int, ...]] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape))) for b in net.blocks]
    try:
        with _fixed(net, _smallest_architecture(net)), torch.no_grad():
            net(_image(net))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _smallest_architecture(net: nn.Module) -> Architecture:
    blocks = tuple(BlockChoice("skip", ()) for _ in net.blocks)
    return Architecture(net.name, net.img_size, net.num_classes, blocks)


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

"""Latency lookup tables: the measured milliseconds of every choice, on one device, batch, dtype and thread count.

The latency of a choice is measured on the module an export runs, not on the supernet's gated form: for each
mixer, and for each point of a grid of MLP widths, the supernet is exported with every block at that choice,
and each block's branch is timed alone on tokens of the shape it sees (the table's exporter is given by the
caller, who may import it). Each timing is the median of repeated, synchronised calls; its spread is half the
interquartile range. The table stores them as extra columns (`latency_ms`, `latency_spread_ms`) of its rows, the
MLP curve as rows of item `mlp_width` (`units` the kept width), and in its header the context it was measured in
and the rest of the network (`fixed_ms`: every block empty, end to end, less the empty blocks' own).

Additivity is checked, not assumed: a whole network's latency is not the sum of its parts (launches, caches,
fused kernels). Measuring a few exported networks end to end, the table fits latency = scale·Σ + offset and
stores the fit with each check's residual; `LookupTable.latency(arch)` returns the corrected prediction.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from supernets import MIXERS, Architecture, BlockChoice
from supernets.devices import device_name, synchronize
from supernets.family import family_of

from .table_format import LATENCY, MLP_WIDTH, SPREAD, LatencyPrediction

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A timer takes what is timed and the call, and returns (median, spread) in ms. The key, which a fake timer can
# price, is ("mixer", block, mixer, pass), ("mlp", block, kept width) or ("network", architecture).
TimerFn = Callable[[tuple[Any, ...], Callable[[], Any]], tuple[float, float]]


@dataclass(frozen=True)
class LatencyContext:
    """What a latency was measured on; a table measured in another context does not predict this one."""

    device: str
    batch: int
    dtype: str
    threads: int
    torch: str

    @classmethod
    def of(cls, device: torch.device, batch: int, dtype: str, threads: int | None = None) -> LatencyContext:
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        if batch < 1:
            raise ValueError(f"latency batch must be at least 1, got {batch}")
        threads = threads or torch.get_num_threads()
        return cls(device_name(device), batch, dtype, threads, torch.__version__)

    def describe(self) -> str:
        return f"{self.device}, batch {self.batch}, {self.dtype}, {self.threads} threads, torch {self.torch}"

    def check_matches(self, other: LatencyContext) -> None:
        """Raise a `ValueError` naming what differs if `other` is not this context."""
        for field in ("device", "batch", "dtype", "threads", "torch"):
            if getattr(self, field) != getattr(other, field):
                raise ValueError(
                    f"the latency table was measured with {field} {getattr(self, field)!r}, not "
                    f"{getattr(other, field)!r} ({self.describe()}); measure one here with `spvit lut --latency`"
                )


class Timer:
    """Median and spread (half the interquartile range) of `repeats` synchronised timings of a call, in ms, after
    `warmup` untimed calls; `clock` is injectable."""

    def __init__(
        self, device: torch.device, repeats: int = 20, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.device, self.repeats, self.warmup, self.clock = device, repeats, warmup, clock

    @torch.inference_mode()
    def __call__(self, key: tuple[Any, ...], fn: Callable[[], Any]) -> tuple[float, float]:
        for _ in range(self.warmup):
            fn()
        synchronize(self.device)
        samples = []
        for _ in range(self.repeats):
            start = self.clock()
            fn()
            synchronize(self.device)
            samples.append(1000 * (self.clock() - start))
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return statistics.median(samples), (quartiles[2] - quartiles[0]) / 2


def mlp_grid(hidden: int, points: int) -> list[int]:
    """`points` + 1 widths from 0 to `hidden`, evenly spaced (every width where there are fewer)."""
    return sorted({round(hidden * j / points) for j in range(points + 1)})


def measure_latency(
    net: nn.Module,
    frame_rows: list[dict[str, Any]],
    shapes: list[tuple[int, ...]],
    export: Callable[[Architecture], nn.Module],
    context: LatencyContext,
    timer: TimerFn,
    mlp_points: int = 32,
    checks: int = 6,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`frame_rows` (a lookup table's rows of `net`) with the latency columns, the MLP curve rows added, and the
    header's `latency` entry (context, fixed_ms, the correction and its checks). `shapes`: each block's input
    tokens' shape for one image.

    `export(arch)` builds the plain subnet of `net` for `arch` on `net`'s device, which the timings run; `checks`
    exported networks (the dense, the empty, random ones) are measured end to end for the correction."""
    family = family_of(net)
    device = next(net.parameters()).device
    dtype = DTYPES[context.dtype]
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()
    widths = family.table_widths(net)
    if len(widths) > 1 or net.discrete_choices():
        raise ValueError(f"latency tables price every choice of the gates only; '{net.name}' has choices outside them")
    dense = net.dense_architecture()
    shapes = [(context.batch, *s[1:]) for s in shapes]
    rows = [dict(r, **{LATENCY: 0.0, SPREAD: 0.0}) for r in frame_rows]
    by_key = {(r["block"], r["item"], r["choice"]): r for r in rows}

    def time_branch(key: tuple[Any, ...], branch: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> tuple:
        x = torch.zeros(shape, device=device)
        with autocast:
            return timer(key, lambda: branch(x))

    def uniform(mixer: str, fraction: float) -> Architecture:
        blocks = [BlockChoice(mixer, tuple(range(round(h * fraction)))) for h in net.mlp_hidden]
        return net.architecture_of(blocks)

    for mixer in MIXERS:
        subnet = export(uniform(mixer, 1.0)).eval()
        for i, (block, shape) in enumerate(zip(subnet.blocks, shapes, strict=True)):
            if mixer == "skip" and not net.blocks[i].attn.has_branch("skip"):
                continue
            passes = net.block_passes(i)
            samples = [time_branch(("mixer", i, mixer, p), _call(block.mixer_branch, kw), shape)
                       for p, kw in enumerate(passes)]  # fmt: skip
            by_key[i, "mixer", mixer][LATENCY] = sum(m for m, _ in samples)
            by_key[i, "mixer", mixer][SPREAD] = sum(s for _, s in samples)
    grids = [mlp_grid(h, mlp_points) for h in net.mlp_hidden]
    for j in range(max(len(g) for g in grids)):
        fractions = [g[min(j, len(g) - 1)] / h for g, h in zip(grids, net.mlp_hidden, strict=True)]
        subnet = export(net.architecture_of([BlockChoice("skip", tuple(range(round(f * h)))) for f, h in
                                             zip(fractions, net.mlp_hidden, strict=True)])).eval()  # fmt: skip
        for i, (block, shape, grid) in enumerate(zip(subnet.blocks, shapes, grids, strict=True)):
            if j >= len(grid):
                continue
            passes = len(net.block_passes(i))
            median, spread = time_branch(("mlp", i, grid[j]), block.mlp_branch, shape)
            rows.append(dict(block=i, item=MLP_WIDTH, choice="", macs=0, params=0, units=grid[j], width=0,
                             **{LATENCY: passes * median, SPREAD: passes * spread}))  # fmt: skip
    empty = uniform("skip", 0.0)
    images = torch.zeros(context.batch, net.in_chans, net.img_size, net.img_size, device=device)

    def end_to_end(arch: Architecture) -> float:
        subnet = export(arch).eval()
        with autocast:
            return timer(("network", arch), lambda: subnet(images))[0]

    partial = LatencyPrediction(rows, fixed_ms=0.0, scale=1.0, offset=0.0)
    fixed_ms = end_to_end(empty) - partial.raw(empty)
    prediction = partial.with_fixed(fixed_ms)
    rng = random.Random(0)
    archs = {"dense": dense, "empty": empty}
    for k in range(max(checks - 2, 0)):
        archs[f"random{k}"] = net.architecture_of(
            [
                BlockChoice(rng.choice(MIXERS), tuple(sorted(rng.sample(range(h), rng.randint(0, h)))))
                for h in net.mlp_hidden
            ]  # fmt: skip
        )
    measured = {name: end_to_end(arch) for name, arch in archs.items()}
    raw = {name: prediction.raw(arch) for name, arch in archs.items()}
    scale, offset = np.polyfit(list(raw.values()), list(measured.values()), 1) if len(archs) > 1 else (1.0, 0.0)
    header = {
        **asdict(context),
        "fixed_ms": fixed_ms,
        "scale": float(scale),
        "offset": float(offset),
        "checks": [
            {"arch": name, "measured_ms": measured[name], "predicted_ms": float(scale * raw[name] + offset)}
            for name in archs
        ],
    }
    return rows, header


def _call(branch: Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: branch(x, **kwargs)

"""Latency lookup tables: the measured milliseconds of every choice, on one device, batch, dtype and thread count.

The latency of a choice is measured on the module an export runs, not on the supernet's gated form: for each
mixer, and for each point of a grid of MLP widths, the supernet is exported with every block at that choice,
and each block's branch is timed alone on tokens of the shape it sees (the table's exporter is given by the
caller, who may import it). Each timing is the median of repeated, synchronised calls; its spread is half the
interquartile range. The calls of one kind are timed interleaved, round after round, so that a slow spell of a
shared machine slows every candidate alike instead of whichever was being timed. The table stores the timings
as extra columns (`latency_ms`, `latency_spread_ms`) of its rows, the MLP curve as rows of item `mlp_width`
(`units` the kept width), and in its header the context it was measured in and the rest of the network
(`fixed_ms`: every block empty, end to end, less the empty blocks' own).

Additivity is checked, not assumed: a whole network's latency is not the sum of its parts (launches, caches,
fused kernels). Measuring a few exported networks end to end, the table fits latency = scale·Σ + offset and
stores the fit with each check's residual; `LookupTable.latency(arch)` returns the corrected prediction.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from supernets import MIXERS, Architecture, BlockChoice
from supernets.devices import device_name, synchronize
from supernets.family import family_of

from .table_format import EXTRA_MSA, LATENCY, MLP_WIDTH, SPREAD, WIDTH, LatencyPrediction, table_width

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A timer takes the calls to time, by key, and returns each one's (median, spread) in ms. A key, which a fake
# timer can price, is (width, block, "mixer", mixer, pass), (width, block, EXTRA_MSA, selector, pass),
# (width, block, MLP_WIDTH, kept units) or ("network", name, architecture).
Timings = dict[tuple[Any, ...], tuple[float, float]]
TimerFn = Callable[[dict[tuple[Any, ...], Callable[[], Any]]], Timings]


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
    """Median and spread (half the interquartile range) of `repeats` synchronised timings of each call, in ms,
    after `warmup` untimed calls of each. The calls are timed in rounds, each round calling every one once in a
    shuffled order; `clock` is injectable."""

    def __init__(
        self, device: torch.device, repeats: int = 20, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.device, self.repeats, self.warmup, self.clock = device, repeats, warmup, clock

    @torch.inference_mode()
    def __call__(self, calls: dict[tuple[Any, ...], Callable[[], Any]]) -> Timings:
        for fn in calls.values():
            for _ in range(self.warmup):
                fn()
        synchronize(self.device)
        order = list(calls)
        rng = random.Random(0)
        samples: dict[tuple[Any, ...], list[float]] = {key: [] for key in order}
        for _ in range(self.repeats):
            rng.shuffle(order)
            for key in order:
                start = self.clock()
                calls[key]()
                synchronize(self.device)
                samples[key].append(1000 * (self.clock() - start))
        return {key: _median_and_spread(times) for key, times in samples.items()}


def _median_and_spread(samples: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return statistics.median(samples), (quartiles[2] - quartiles[0]) / 2


def mlp_grid(hidden: int, points: int) -> list[int]:
    """`points` + 1 widths from 0 to `hidden`, evenly spaced (every width where there are fewer)."""
    return sorted({round(hidden * j / points) for j in range(points + 1)})


def measure_latency(
    net: nn.Module,
    frame_rows: list[dict[str, Any]],
    shapes: dict[int, list[tuple[int, ...]]],
    export: Callable[[Architecture], nn.Module],
    context: LatencyContext,
    timer: TimerFn,
    mlp_points: int = 32,
    checks: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`frame_rows` (a lookup table's rows of `net`) with the latency columns, the MLP curve rows added, and the
    header's `latency` entry (context, fixed_ms per width, the correction and its checks). `shapes`: per width the
    table prices, each block's input tokens' shape for one image.

    `export(arch)` builds the plain subnet of `net` for `arch` on `net`'s device, which the timings run. The
    correction is fitted on `checks` exported networks measured end to end (the dense, random ones); the empty
    network of each width, measured with them, gives that width's rest of the network."""
    family = family_of(net)
    device = next(net.parameters()).device
    rows = [dict(r, **{LATENCY: 0.0, SPREAD: 0.0}) for r in frame_rows]
    by_key = {(r[WIDTH], r["block"], r["item"], r["choice"]): r for r in rows}
    templates = {w: family.smallest_architecture(net, w) for w in shapes}
    hidden = {w: [r["units"] for r in sorted(rows, key=lambda r: r["block"]) if r[WIDTH] == w and r["item"] ==
                  "mlp_unit"] for w in shapes}  # fmt: skip

    def at(width: int, blocks: list[BlockChoice]) -> Architecture:
        return dataclasses.replace(templates[width], blocks=tuple(blocks))

    def on_tokens(branch: Callable[..., torch.Tensor], shape: tuple[int, ...], **kwargs: Any) -> Callable[[], Any]:
        x = torch.zeros(context.batch, *shape[1:], device=device)

        def call() -> torch.Tensor:
            with autocast(context, device):
                return branch(x, **kwargs)

        return call

    for width, block_shapes in shapes.items():
        # Every mixer of every block (an msa at each of its family's extra choices too), interleaved.
        mixer_calls = {}
        for mixer in MIXERS:
            subnet = export(at(width, [BlockChoice(mixer, tuple(range(h))) for h in hidden[width]])).eval()
            for i, (block, shape) in enumerate(zip(subnet.blocks, block_shapes, strict=True)):
                if mixer == "skip" and not net.blocks[i].attn.has_branch("skip"):
                    continue
                for p, kwargs in enumerate(net.block_passes(i)):
                    mixer_calls[width, i, "mixer", mixer, p] = on_tokens(block.mixer_branch, shape, **kwargs)
                if mixer == "msa":
                    for choice, p, kwargs in family.extra_msa_passes(net, i):
                        mixer_calls[width, i, EXTRA_MSA, choice, p] = on_tokens(block.mixer_branch, shape, **kwargs)
        for (w, i, item, choice, _), (median, spread) in timer(mixer_calls).items():
            by_key[w, i, item, choice][LATENCY] += median
            by_key[w, i, item, choice][SPREAD] += spread
        del mixer_calls, subnet
        # Every block's MLP at every point of its grid, interleaved.
        grids = [mlp_grid(h, mlp_points) for h in hidden[width]]
        mlp_calls = {}
        for j in range(max(len(g) for g in grids)):
            kept = [g[min(j, len(g) - 1)] for g in grids]
            subnet = export(at(width, [BlockChoice("skip", tuple(range(k))) for k in kept])).eval()
            for i, (block, shape, grid) in enumerate(zip(subnet.blocks, block_shapes, grids, strict=True)):
                if j < len(grid):
                    mlp_calls[width, i, MLP_WIDTH, grid[j]] = on_tokens(block.mlp_branch, shape)
        for (w, i, _, units), (median, spread) in timer(mlp_calls).items():
            passes = len(net.block_passes(i))  # the MLP takes nothing from the pass: every application costs the same
            rows.append(dict(block=i, item=MLP_WIDTH, choice="", macs=0, params=0, units=units, **{WIDTH: w},
                             **{LATENCY: passes * median, SPREAD: passes * spread}))  # fmt: skip
        del mlp_calls, subnet
    empties = {f"empty{w or ''}": at(w, [BlockChoice("skip", ()) for _ in hidden[w]]) for w in shapes}
    fitted = {"dense": net.dense_architecture(), **_random_architectures(net, templates, hidden, checks - 1)}
    images = timing_images(net, context, device)
    timings = timer(network_calls(empties | fitted, export, images, context))
    measured = {name: ms for (_, name, _), (ms, _) in timings.items()}

    blocks = {w: LatencyPrediction([r for r in rows if r[WIDTH] == w], 0.0, 1.0, 0.0) for w in shapes}
    empty_of = dict(zip(shapes, empties, strict=True))
    # Each network is fitted against the empty one of its width: latency - the empty's = scale·(its blocks - the
    # empty's) + offset. The offset is the step from a network whose blocks launch nothing to one that runs a
    # branch (measured on deit_small: +25 ms on 600 ms for every such network, which the parts alone do not show),
    # so the empty networks themselves are left out of the fit.
    x, y = [], []
    for name, arch in fitted.items():
        width = table_width(arch)
        x.append(blocks[width].raw(arch) - blocks[width].raw(empties[empty_of[width]]))
        y.append(measured[name] - measured[empty_of[width]])
    scale, offset = np.polyfit(x, y, 1) if len(fitted) > 1 else (1.0, 0.0)
    # In the stored form, latency = scale·(fixed_ms + the blocks) + offset, equal to the fit above.
    fixed_ms = {str(w): measured[empty_of[w]] / scale - blocks[w].raw(empties[empty_of[w]]) for w in shapes}
    prediction = {w: blocks[w].with_fixed(fixed_ms[str(w)]) for w in shapes}
    raw = {name: prediction[table_width(arch)].raw(arch) for name, arch in (empties | fitted).items()}
    header = {
        **asdict(context),
        "fixed_ms": fixed_ms,
        "scale": float(scale),
        "offset": float(offset),
        "checks": [
            {
                "arch": name,
                "measured_ms": measured[name],
                "predicted_ms": float(scale * raw[name] + offset),
                "fitted": name in fitted,
            }
            for name in (empties | fitted)
        ],
    }
    return rows, header


def _random_architectures(
    net: nn.Module, templates: dict[int, Architecture], hidden: dict[int, list[int]], count: int
) -> dict[str, Architecture]:
    """`count` architectures of random widths and depths (where the table prices several), mixers and kept MLP
    units, the same for every run."""
    rng = random.Random(0)
    depths = net.discrete_choices().get("depth", [net.depth])
    archs = {}
    for k in range(max(count, 0)):
        width = rng.choice(list(templates))
        depth = rng.choice(depths)
        blocks = [BlockChoice(rng.choice(MIXERS), tuple(sorted(rng.sample(range(h), rng.randint(0, h)))))
                  for h in hidden[width][:depth]]  # fmt: skip
        archs[f"random{k}"] = dataclasses.replace(templates[width], blocks=tuple(blocks))
    return archs


def network_calls(
    archs: dict[str, Architecture],
    export: Callable[[Architecture], nn.Module],
    images: torch.Tensor,
    context: LatencyContext,
) -> dict[tuple[Any, ...], Callable[[], Any]]:
    """A timer's calls of the exported subnets of `archs` on `images` (a batch of `context`), keyed
    ("network", name, architecture)."""
    calls = {}
    for name, arch in archs.items():
        subnet = export(arch).eval()

        def call(subnet: nn.Module = subnet) -> torch.Tensor:
            with autocast(context, images.device):
                return subnet(images)

        calls["network", name, arch] = call
    return calls


def timing_images(net: nn.Module, context: LatencyContext, device: torch.device) -> torch.Tensor:
    """The batch a network of `net` is timed on in `context`: zeros, as the timings do not depend on the pixels."""
    return torch.zeros(context.batch, net.in_chans, net.img_size, net.img_size, device=device)


def autocast(context: LatencyContext, device: torch.device) -> AbstractContextManager:
    """The timed calls' precision: autocast to the context's dtype, or nothing for fp32."""
    dtype = DTYPES[context.dtype]
    return torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()

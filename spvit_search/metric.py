"""What a budget counts: MACs (the default) or the milliseconds a latency table predicts.

A cost metric prices an architecture, the dense model and the search space's range, gives the gradient search the
differentiable cost of its gates, and projects the gates onto a budget. The latency projection runs the MACs
projection on an integer view of the table (each part in ns, each MLP by its chord from the empty to the full
width), then re-prices the result by the prediction (each MLP on its curve) and tightens the view's target until
the prediction meets the budget.

A table predicts a whole network's latency from its parts, and the smallest subnets miss most (the parts it
fits on leave out what shrinks least). Where the search runs in the table's context (device, batch, dtype, threads),
the latency projection is then checked by measuring: the exported subnet is timed end to end and, while it misses
the budget by more than `MEASURED_TOLERANCE`, the goal the table projects onto is rescaled by budget ÷ measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch import nn

from lookup_tables import LatencyContext, LookupTable, Timer, differentiable_flops, network_calls
from lookup_tables.cost import differentiable_latency
from lookup_tables.latency import timing_images
from lookup_tables.table_format import LATENCY, WIDTH
from supernets import Architecture, Supernet

from .export import export_subnet
from .projection import project_to_budget

METRICS = ("macs", "latency")
MEASURED_TOLERANCE = 0.02  # of the budget: a measured subnet this close is on it
MEASURED_ROUNDS = 4  # measurements, at most, of the latency projection


class MacsMetric:
    name = "macs"
    unit = "GMACs"

    def __init__(self, lut: LookupTable) -> None:
        self.lut = lut

    def of(self, arch: Architecture) -> float:
        return float(self.lut.flops(arch))

    def dense(self) -> float:
        return float(self.lut.dense_flops())

    def range(self, full_size: bool = False) -> tuple[float, float]:
        return self.lut.range(full_size)

    @staticmethod
    def number(value: float) -> str:
        return f"{value / 1e9:.4f}"

    def differentiable(self, net: nn.Module, estimator: str) -> torch.Tensor:
        return differentiable_flops(net, self.lut, estimator)

    def project(self, net: nn.Module, target: float) -> Architecture:
        return project_to_budget(net, self.lut, round(target))


class LatencyMetric:
    name = "latency"
    unit = "ms"

    def __init__(self, lut: LookupTable) -> None:
        if lut.latency_prediction is None:
            raise ValueError(
                "--metric latency needs a latency lookup table: `spvit lut --latency ... --out FILE`, then --lut FILE"
            )
        self.lut = lut

    def of(self, arch: Architecture) -> float:
        return self.lut.latency(arch)

    def dense(self) -> float:
        return self.lut.latency_prediction.dense()

    def range(self, full_size: bool = False) -> tuple[float, float]:
        return self.lut.latency_range(full_size)

    @staticmethod
    def number(value: float) -> str:
        return f"{value:.3f}"

    def differentiable(self, net: nn.Module, estimator: str) -> torch.Tensor:
        return differentiable_latency(net, self.lut, estimator)

    def project(self, net: nn.Module, target: float) -> Architecture:
        """The architecture of `net`'s gates that the table predicts runs in at most `target` ms, as close as it
        gets."""
        view, offset = self.projection_table(), self.lut.latency_prediction.offset
        goal = target
        for _ in range(8):
            arch = project_to_budget(net, view, round(1e6 * (goal - offset)))
            predicted = self.of(arch)
            if predicted <= target:
                return arch
            goal -= 1.05 * (predicted - target)
        raise ValueError(f"could not project onto {target:.3f} ms: the prediction stays at {predicted:.3f} ms")

    def project_measured(
        self, net: nn.Module, target: float, measure: Callable[[Architecture], float]
    ) -> tuple[Architecture, float, list[dict[str, float]]]:
        """`project`, checked by `measure` (an architecture's measured ms): while the measurement misses `target`
        by more than `MEASURED_TOLERANCE`, project again onto the goal rescaled by target ÷ measured. Returns the
        architecture measured closest to `target`, its measurement, and each round's goal, prediction and
        measurement."""
        goal, rounds, best = target, [], None
        for _ in range(MEASURED_ROUNDS):
            try:
                arch = self.project(net, goal)
            except ValueError:  # a goal below what the gates can reach: keep the best so far
                break
            measured = measure(arch)
            rounds.append({"goal_ms": goal, "predicted_ms": self.of(arch), "measured_ms": measured})
            if best is None or abs(measured - target) < abs(best[1] - target):
                best = (arch, measured)
            if abs(measured / target - 1) <= MEASURED_TOLERANCE:
                break
            goal *= target / measured
        if best is None:
            raise ValueError(f"could not project onto {target:.3f} ms")
        return best[0], best[1], rounds

    def projection_table(self) -> LookupTable:
        """The table with its `macs` column in corrected nanoseconds, less the offset: the rest of the network on
        the first fixed row, each mixer's own, and each MLP's chord (its empty cost, and per kept unit)."""
        p = self.lut.latency_prediction
        frame = self.lut.to_frame()
        frame = frame[frame[WIDTH] == frame[WIDTH].max()].reset_index(drop=True)  # the gates' width
        ns = pd.Series(0.0, index=frame.index)
        ns[frame.item == "mixer"] = frame[LATENCY][frame.item == "mixer"]
        ns[frame.index[frame.item == "fixed"][0]] = p.fixed_ms
        for i, curve in p.curves.items():
            ns[(frame.block == i) & (frame.item == "mlp_fixed")] = curve[0, 1]
            ns[(frame.block == i) & (frame.item == "mlp_unit")] = (curve[-1, 1] - curve[0, 1]) / curve[-1, 0]
        return LookupTable(self.lut.meta, frame.assign(macs=(ns * p.scale * 1e6).round().astype("int64")))


def cost_metric(lut: LookupTable, name: str) -> MacsMetric | LatencyMetric:
    if name not in METRICS:
        raise ValueError(f"--metric '{name}' is not one of {', '.join(METRICS)}")
    return MacsMetric(lut) if name == "macs" else LatencyMetric(lut)


def latency_meter(
    net: Supernet, lut: LookupTable, device: torch.device, relative: bool
) -> Callable[[Architecture], float]:
    """`measure(arch)`: the ms of `arch`'s exported subnet of `net`, timed end to end on `device` in the table's
    context (a `ValueError` says what differs where this process is not in it). For a budget `relative` to dense,
    the dense model is timed in the same rounds, and the subnet's time scaled by predicted ÷ measured dense, so that
    a machine running faster or slower than when the table was measured lands on the same fraction."""
    context = lut.latency_context
    context.check_matches(LatencyContext.of(device, context.batch, context.dtype))
    timer = Timer(device)
    images = timing_images(net, context, device)
    dense = net.dense_architecture()
    dense_ms = lut.latency(dense)

    def measure(arch: Architecture) -> float:
        archs = {"subnet": arch} | ({"dense": dense} if relative else {})
        timings = timer(network_calls(archs, lambda a: export_subnet(net, a), images, context))
        ms: dict[Any, float] = {name: median for (_, name, _), (median, _) in timings.items()}
        return ms["subnet"] * (dense_ms / ms["dense"] if relative else 1.0)

    return measure

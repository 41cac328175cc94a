"""What a budget counts: MACs (the default) or the milliseconds a latency table predicts.

A cost metric prices an architecture, the dense model and the search space's range, gives the gradient search the
differentiable cost of its gates, and projects the gates onto a budget. The latency projection runs the MACs
projection on an integer view of the table (each part in ns, each MLP by its chord from the empty to the full
width), then re-prices the result by the prediction (each MLP on its curve) and tightens the view's target until
the prediction meets the budget.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from lookup_tables import LookupTable, differentiable_flops
from lookup_tables.cost import differentiable_latency
from lookup_tables.table_format import LATENCY, WIDTH
from supernets import Architecture

from .projection import project_to_budget

METRICS = ("macs", "latency")


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
        view, offset = self.projection_table(), self.lut.latency_prediction.offset
        goal = target
        for _ in range(8):
            arch = project_to_budget(net, view, round(1e6 * (goal - offset)))
            predicted = self.of(arch)
            if predicted <= target:
                return arch
            goal -= 1.05 * (predicted - target)
        raise ValueError(f"could not project onto {target:.3f} ms: the prediction stays at {predicted:.3f} ms")

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

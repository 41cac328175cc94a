"""MAC counting with fvcore, including the attention matmuls it skips, split into the `core` subset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

# Matrix work: weight multiply-adds and attention matmuls. The `core` convention (the papers that count matrix work
# alone) counts only these; `fvcore` adds what fvcore counts besides (norms, pooling, upsampling).
CORE_OPERATORS = frozenset({"linear", "addmm", "matmul", "bmm", "mm", "einsum", "conv", "scaled_dot_product_attention"})


def sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """MACs of `scaled_dot_product_attention`: q @ kᵀ and attn @ v, which fvcore otherwise skips."""
    q, k, v = (get_shape(x) for x in inputs[:3])  # (..., Nq, dk), (..., Nk, dk), (..., Nk, dv)
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_macs_by_operator(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """fvcore's MACs per operator for one forward of `module` (in its current train/eval mode)."""
    return {op: int(n) for op, n in _analysis(module, inputs).by_operator().items()}


def _analysis(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> FlopCountAnalysis:
    # The count depends on shapes alone: inputs go where the module lives (a GPU model is traced on its GPU).
    device = next((p.device for p in module.parameters()), None)
    if device is not None and device.type != "meta":
        inputs = tuple(x.to(device) for x in inputs)
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def total_macs(by_operator: dict[str, int], convention: str) -> int:
    if convention == "fvcore":
        return sum(by_operator.values())
    if convention == "core":
        return sum(n for op, n in by_operator.items() if op in CORE_OPERATORS)
    raise ValueError(f"convention '{convention}' is not measured; expected fvcore or core")


def count_macs(module: nn.Module, *inputs: torch.Tensor, convention: str = "fvcore") -> int:
    return total_macs(count_macs_by_operator(module, *inputs), convention)


def count_macs_by_child(module: nn.Module, *inputs: torch.Tensor, convention: str = "fvcore") -> dict[str, int]:
    """MACs of one forward per top-level child module of `module`."""
    analysis = _analysis(module, inputs)
    return {
        name: total_macs(dict(ops), convention)
        for name, ops in analysis.by_module_and_operator().items()
        if name and "." not in name
    }


def fixed_rows(net: nn.Module, macs: dict[str, int]) -> list[dict[str, Any]]:
    """One row per part outside the blocks (patch embedding, tokens, norms, head)."""
    params = net.fixed_parameter_counts()
    return [
        dict(block=-1, item="fixed", choice=name, macs=macs.get(name, 0), params=params.get(name, 0))
        for name in [*params, *(n for n in macs if n not in params)]
        if macs.get(name, 0) or params.get(name, 0)
    ]

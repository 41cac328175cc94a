"""MAC counting with fvcore, including the attention matmuls it skips, split into the `core` subset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

# Matrix work: weight multiply-adds and attention matmuls. The `core` convention (T2T-ViT, SReT)
# counts only these; `fvcore` adds what fvcore counts besides (norms, pooling, upsampling).
CORE_OPERATORS = frozenset({"linear", "addmm", "matmul", "bmm", "mm", "einsum", "conv", "scaled_dot_product_attention"})


def sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """MACs of `scaled_dot_product_attention`: q @ kᵀ and attn @ v, which fvcore otherwise skips."""
    q, k, v = (get_shape(x) for x in inputs[:3])  # (..., Nq, dk), (..., Nk, dk), (..., Nk, dv)
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_macs_by_operator(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """fvcore's MACs per operator for one forward of `module` (in its current train/eval mode)."""
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return {op: int(n) for op, n in analysis.by_operator().items()}


def total_macs(by_operator: dict[str, int], convention: str) -> int:
    if convention == "fvcore":
        return sum(by_operator.values())
    if convention == "core":
        return sum(n for op, n in by_operator.items() if op in CORE_OPERATORS)
    raise ValueError(f"convention '{convention}' is not measured; expected fvcore or core")


def count_macs(module: nn.Module, *inputs: torch.Tensor, convention: str = "fvcore") -> int:
    return total_macs(count_macs_by_operator(module, *inputs), convention)


def fixed_parameter_count(net: nn.Module) -> int:
    """Parameters outside the blocks' choices: stem, tokens, final norm, head (gate logits excluded)."""
    gates = {id(p) for p in net.gate_parameters()}
    in_blocks = {id(p) for p in net.blocks.parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in gates and id(p) not in in_blocks)

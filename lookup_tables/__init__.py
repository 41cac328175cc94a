"""The cost model: MACs and parameters per block and per choice of the search space."""

from .cost import differentiable_flops
from .counting import count_macs, count_macs_by_operator
from .table import CONVENTIONS, LookupTable, build_lookup_table

__all__ = [
    "CONVENTIONS",
    "LookupTable",
    "build_lookup_table",
    "count_macs",
    "count_macs_by_operator",
    "differentiable_flops",
]

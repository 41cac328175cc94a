"""The cost model: MACs and parameters per block and per choice of the search space.

The names below load on first use (PEP 562), so that the table file's format (`lookup_tables.table_format`,
which the reports read) imports without torch.
"""

from __future__ import annotations

from supernets.lazy import lazy_exports

# Each public name and the module that defines it.
_EXPORTS = {
    "CONVENTIONS": "table",
    "LookupTable": "table",
    "build_lookup_table": "table",
    "build_latency_table": "table",
    "LatencyContext": "latency",
    "Timer": "latency",
    "network_calls": "latency",
    "count_macs": "counting",
    "count_macs_by_operator": "counting",
    "differentiable_flops": "cost",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

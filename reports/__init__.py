"""Tables and plots of what a search did, from its run directories."""

from __future__ import annotations

from typing import Any

__all__ = ["Report", "write_report"]


def __getattr__(name: str) -> Any:
    # Every command reads `reports.run_format`; only a report needs matplotlib, a second of every start.
    if name in __all__:
        from . import document

        return getattr(document, name)
    raise AttributeError(f"module 'reports' has no attribute {name!r}")

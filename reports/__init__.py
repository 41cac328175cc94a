"""Tables and plots of what a search did, from its run directories.

The names below load on first use (PEP 562): every command reads `reports.run_format`, and only a report needs
matplotlib, a second of every start.
"""

from __future__ import annotations

from supernets.lazy import lazy_exports

_EXPORTS = {"Report": "document", "write_report": "document"}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

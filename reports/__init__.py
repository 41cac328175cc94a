"""Tables and plots of what a search did, from its run directories."""

from .document import Report, write_report

__all__ = ["Report", "write_report"]

"""The spvit-search workflow: CLI, data, search loop, export."""

from .export import export_subnet, load_subnet, save_subnet

__all__ = ["export_subnet", "load_subnet", "save_subnet"]

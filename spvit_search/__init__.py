"""The spvit-search workflow: CLI, data, search loop, export."""

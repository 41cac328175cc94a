"""SReT's architecture field, pure Python (the torch-free contract reads it): `groups`, the sliced attention's group
count per stage and pass (`[[8, 2], [4, 1], [1, 1]]`); the `blocks` are the distinct blocks, each shared by the
passes of its stage."""

from __future__ import annotations

from typing import Any

from ...architecture import positive_int


def group_counts(field: str, value: Any) -> tuple[tuple[int, ...], ...]:
    """The group splits: per stage, one positive group count per pass (lists in JSON, tuples once parsed)."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{field}: expected a non-empty list with the group counts of each stage, got {value!r:.40}")
    stages = []
    for s, counts in enumerate(value):
        if not isinstance(counts, list | tuple) or not counts:
            raise ValueError(f"{field}[{s}]: expected a non-empty list with a group count per pass, got {counts!r:.30}")
        stages.append(tuple(positive_int(f"{field}[{s}][{p}]", g) for p, g in enumerate(counts)))
    return tuple(stages)


ARCHITECTURE_FIELDS = {"groups": group_counts}

"""`Architecture`: the one data contract. It names a subnet of a supernet, as data.

Search produces it, the lookup table prices it, the exporter builds it, fine-tuning trains it and
reports draw it. Its JSON form:

    {"model": "deit_tiny_patch16_224", "img_size": 224, "num_classes": 1000,
     "blocks": [{"mixer": "bconv1", "mlp_kept": [0, 3, 4, 7]}, {"mixer": "msa", "mlp_kept": [0, 1, 2]}]}

A search space whose skip candidate is RIFormer's affine skip (`--skip-mixer affine`) writes `"skip_mixer":
"affine"` too: its skip blocks keep one norm that computes an affine map of their tokens. Without the field a skip
block is the identity (`"identity"`, as before the field was).

Family fields: a family whose search also chooses dimensions outside the blocks adds optional top-level
fields, declared in its folder's `schema.py` (pure Python, as this module is) with the check that parses them;
they live in `extras`, are present in its architectures and absent from every other's JSON, and read as
attributes (`arch.embed_dim`, None where absent). Depth needs no field: it is the number of `blocks`, which are
the first blocks of the supernet. Which depths and family values a supernet offers is its `choices` (see
`Architecture.validate_for`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text

# Token mixers ordered by cost: a cumulative gate can switch on a mixer only if every cheaper one is on.
MIXERS: tuple[str, ...] = ("skip", "bconv1", "bconv3", "msa")
CONV_KERNEL_SIZE = {"bconv1": 1, "bconv3": 3}
# What a skip block computes: nothing (the residual alone), or RIFormer's affine map of its normalised tokens.
SKIP_MIXERS = ("identity", "affine")

_TOP_LEVEL_FIELDS = ("model", "img_size", "num_classes", "blocks")
_BLOCK_FIELDS = ("mixer", "mlp_kept")


def positive_int(field: str, value: Any) -> int:
    """The check of a family field that holds one positive int."""
    check_type(field, value, int)
    if value <= 0:
        raise ValueError(f"{field}: must be positive, got {value}")
    return value


@functools.cache
def family_fields() -> dict[str, Callable[[str, Any], Any]]:
    """Every family's architecture fields, each with the check that turns its JSON value into the field's value
    (or raises a `ValueError` naming the field), in the families' order (the order of the JSON form). Read from
    the families' torch-free `schema` modules."""
    from .families import FAMILY_NAMES

    fields: dict[str, Callable[[str, Any], Any]] = {}
    for family in FAMILY_NAMES:
        module = f"{__package__}.families.{family}.schema"
        if importlib.util.find_spec(module) is None:
            continue
        declared = importlib.import_module(module).ARCHITECTURE_FIELDS
        if twice := sorted(set(declared) & (set(fields) | set(_TOP_LEVEL_FIELDS))):
            raise ValueError(f"architecture field {twice[0]!r} is declared twice")
        fields |= declared
    return fields


@dataclass(frozen=True)
class BlockChoice:
    """The choice made in one transformer block: its token mixer and its kept MLP hidden units."""

    mixer: str
    mlp_kept: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_kept", tuple(self.mlp_kept))


@dataclass(frozen=True)
class Architecture:
    model: str
    img_size: int
    num_classes: int
    blocks: tuple[BlockChoice, ...]
    # The family fields this architecture sets (see the module docstring); not hashed, as a dict.
    extras: dict[str, Any] = field(default_factory=dict, hash=False)
    skip_mixer: str = "identity"

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        check_type("extras", self.extras, dict)
        for name in self.extras:
            if name not in family_fields():
                raise ValueError(f"{name}: unknown field; no registered family declares it")
        extras = {n: check(n, self.extras[n]) for n, check in family_fields().items() if self.extras.get(n) is not None}
        object.__setattr__(self, "extras", extras)
        check_type("model", self.model, str)
        if not self.model:
            raise ValueError("model: must be a non-empty model name")
        for name in ("img_size", "num_classes"):
            check_type(name, getattr(self, name), int)
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        check_type("skip_mixer", self.skip_mixer, str)
        if self.skip_mixer not in SKIP_MIXERS:
            raise ValueError(f"skip_mixer: '{self.skip_mixer}' is not one of {', '.join(SKIP_MIXERS)}")
        if not self.blocks:
            raise ValueError("blocks: an architecture needs at least one block")
        for i, block in enumerate(self.blocks):
            check_type(f"blocks[{i}]", block, BlockChoice)
            _validate_block(i, block)

    def __getattr__(self, name: str) -> Any:
        # Only for names that are not attributes: a registered family field reads as its value, or None.
        if name in family_fields():
            return self.__dict__.get("extras", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def with_extras(self, **values: Any) -> Architecture:
        """A copy with these family fields set (None removes one)."""
        return dataclasses.replace(self, extras=self.extras | values)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def mixers(self) -> list[str]:
        return [b.mixer for b in self.blocks]

    def validate_for(
        self,
        *,
        model: str,
        img_size: int,
        num_classes: int,
        mlp_hidden: Sequence[int],
        choices: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Raise `ValueError` naming the field if this architecture does not fit the given supernet.

        `mlp_hidden` holds the hidden size of each of the supernet's blocks. `choices` holds the values of
        the discrete dimensions it offers: `depth` (default: exactly its number of blocks) and each family
        field it has; the family fields it does not list must be absent. A nested field (a list per entry) is
        offered in its own shape, with the list of values offered at each entry.
        """
        choices = choices or {}
        if self.model != model:
            raise ValueError(f"model: architecture is for '{self.model}', but the supernet is '{model}'")
        if self.img_size != img_size:
            raise ValueError(f"img_size: architecture is for {self.img_size}, but the supernet takes {img_size}")
        if self.num_classes != num_classes:
            raise ValueError(
                f"num_classes: architecture is for {self.num_classes} classes, the supernet has {num_classes}"
            )
        for name in family_fields():
            value, offered = getattr(self, name), choices.get(name)
            if offered is None and value is not None:
                raise ValueError(f"{name}: '{model}' has no {name} choice, but the architecture sets {_json(value)}")
            if offered is not None:
                _check_offered(name, value, offered, model)
        if "depth" not in choices and len(self.blocks) != len(mlp_hidden):
            raise ValueError(f"blocks: architecture has {len(self.blocks)} blocks, '{model}' has {len(mlp_hidden)}")
        if "depth" in choices and len(self.blocks) not in choices["depth"]:
            depths = ", ".join(map(str, choices["depth"]))
            raise ValueError(f"blocks: architecture has {len(self.blocks)} blocks, '{model}' offers depths {depths}")
        for i, (block, hidden) in enumerate(zip(self.blocks, mlp_hidden[: len(self.blocks)], strict=True)):
            if block.mlp_kept and block.mlp_kept[-1] >= hidden:
                raise ValueError(
                    f"blocks[{i}].mlp_kept: index {block.mlp_kept[-1]} is out of range for hidden size {hidden}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "img_size": self.img_size,
            "num_classes": self.num_classes,
            **{name: _json(value) for name, value in self.extras.items()},
            **({"skip_mixer": self.skip_mixer} if self.skip_mixer != "identity" else {}),
            "blocks": [{"mixer": b.mixer, "mlp_kept": list(b.mlp_kept)} for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Architecture:
        """Build from parsed JSON, checking the schema field by field."""
        if not isinstance(data, dict):
            raise ValueError(f"architecture must be a JSON object, got {type(data).__name__}")
        check_fields("", data, _TOP_LEVEL_FIELDS, optional=("skip_mixer", *family_fields()))
        blocks_data = data["blocks"]
        check_type("blocks", blocks_data, list)
        blocks = []
        for i, b in enumerate(blocks_data):
            check_type(f"blocks[{i}]", b, dict)
            check_fields(f"blocks[{i}].", b, _BLOCK_FIELDS)
            check_type(f"blocks[{i}].mixer", b["mixer"], str)
            check_type(f"blocks[{i}].mlp_kept", b["mlp_kept"], list)
            for j, index in enumerate(b["mlp_kept"]):
                check_type(f"blocks[{i}].mlp_kept[{j}]", index, int)
            blocks.append(BlockChoice(b["mixer"], tuple(b["mlp_kept"])))
        extras = {name: data[name] for name in family_fields() if name in data}
        skip_mixer = data.get("skip_mixer", "identity")
        return cls(data["model"], data["img_size"], data["num_classes"], tuple(blocks), extras, skip_mixer)

    def to_json(self) -> str:
        # One block per line: diffs of two architectures stay readable.
        head = json.dumps({k: v for k, v in self.to_dict().items() if k != "blocks"})[:-1]
        lines = [json.dumps({"mixer": b.mixer, "mlp_kept": list(b.mlp_kept)}) for b in self.blocks]
        return head + ', "blocks": [\n  ' + ",\n  ".join(lines) + "\n]}\n"

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"architecture is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Architecture:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file not found: {path}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: architecture is not valid JSON: not UTF-8 text ({e.reason})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _json(value: Any) -> Any:
    """A field's value as JSON data: tuples (of a nested family field) become lists."""
    return [_json(v) for v in value] if isinstance(value, tuple) else value


def _check_offered(field: str, value: Any, offered: Sequence[Any], model: str) -> None:
    """Raise a `ValueError` naming the field (or its entry) unless `value` is among the values `offered`; a nested
    value (a tuple) is checked entry by entry against `offered` of the same shape."""
    nested = bool(offered) and isinstance(offered[0], list | tuple)
    if value is None:
        listed = f"a choice for each of {len(offered)} entries" if nested else ", ".join(map(str, offered))
        raise ValueError(f"{field}: '{model}' offers {listed}; the architecture has none")
    if nested != isinstance(value, tuple) or (nested and len(value) != len(offered)):
        entries = f"{len(offered)} entries" if nested else "a single value"
        raise ValueError(f"{field}: '{model}' offers {entries}; the architecture has {_json(value)}")
    if nested:
        for i, (entry, options) in enumerate(zip(value, offered, strict=True)):
            _check_offered(f"{field}[{i}]", entry, options, model)
    elif value not in offered:
        raise ValueError(f"{field}: '{model}' offers {', '.join(map(str, offered))}; the architecture has {value}")


def _validate_block(i: int, block: BlockChoice) -> None:
    if block.mixer not in MIXERS:
        raise ValueError(f"blocks[{i}].mixer: unknown mixer '{block.mixer}'; expected one of {', '.join(MIXERS)}")
    kept = block.mlp_kept
    for j, index in enumerate(kept):
        check_type(f"blocks[{i}].mlp_kept[{j}]", index, int)
    if kept and kept[0] < 0:
        raise ValueError(f"blocks[{i}].mlp_kept: index {kept[0]} is negative")
    for a, b in zip(kept, kept[1:], strict=False):
        if a == b:
            raise ValueError(f"blocks[{i}].mlp_kept: index {a} is duplicated")
        if a > b:
            raise ValueError(f"blocks[{i}].mlp_kept: indices must be sorted ascending ({b} comes after {a})")


def check_type(field: str, value: Any, expected: type) -> None:
    """Raise a `ValueError` naming `field` unless `value` is an `expected` (JSON schema checks)."""
    # bool is an int subclass in Python, but `true` is never a valid size or index.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{field}: expected {expected.__name__}, got {type(value).__name__} {value!r:.40}")


def check_fields(prefix: str, data: dict, fields: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Raise a `ValueError` naming the first missing or unknown key of a JSON object (`optional` keys may be absent)."""
    missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: required field is missing")
    unknown = sorted(set(data) - set(fields) - set(optional))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field; expected {', '.join([*fields, *optional])}")

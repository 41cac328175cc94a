"""`Family`: everything the rest of the toolkit asks of a model family, and the registry of families.

A family is one folder under `supernets/families/` that registers one `Family` object: the registry asks it
which timm models it converts and builds its supernet, the exporter asks it for the subnet class and the block
state, the lookup table for its extra rows and their pricing, the Optuna search for its discrete space. Nothing
outside a family's folder tells families apart by class.

The base class is the behaviour of a family without choices outside its blocks (DeiT/ViT); a family overrides
what it adds.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import timm
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .checkpoints import prefixed
from .families import FAMILY_NAMES
from .search_space import BlockwiseSpace

if TYPE_CHECKING:
    import torch

    from .architecture import Architecture, BlockChoice
    from .base import Subnet, Supernet


@dataclass(frozen=True)
class FormulaCosts:
    """MACs by a published formula: of each part outside the blocks (by the supernet's child module), and per block
    of each mixer, of the MLP branch without hidden units (norms included) and per kept hidden unit."""

    fixed: dict[str, int]
    mixers: list[dict[str, int]]
    mlp_fixed: list[int]
    mlp_unit: list[int]


class Family:
    """A model family as the toolkit sees it. Subclasses set the class attributes and override what differs."""

    supernet_class: ClassVar[type[Supernet]]
    subnet_class: ClassVar[type[Subnet]]
    source_classes: ClassVar[tuple[type[nn.Module], ...]]  # the timm model classes it converts
    # Its extra top-level `Architecture` fields, each with the check that parses its JSON value.
    architecture_fields: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}

    @property
    def name(self) -> str | None:
        """As a subnet's config.json records it; ViT's is None, as subnets saved before there were families."""
        return self.subnet_class.family

    def accepts(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's timm models (it may still be unsupported)."""
        return type(model) in self.source_classes

    @property
    def timm_modules(self) -> tuple[str, ...]:
        """The timm modules whose models may be this family's: by default the one named as the family."""
        return (str(self.name),)

    def model_names(self) -> list[str]:
        """Every timm model name this family might convert (each is checked by building it)."""
        return sorted({n for m in self.timm_modules for n in timm.list_models(module=m)})

    def unsupported(self, model: nn.Module) -> list[str]:
        """Why `model` cannot become this family's supernet; empty when it can."""
        return []

    def structure_kwargs(self, name: str) -> dict[str, Any]:
        """timm kwargs that show a model's structure cheaply on the meta device (one block where depth is one
        number)."""
        return {"depth": 1}

    def checkpoint_filter(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """A timm-format state dict adapted to `model` (e.g. position embeddings resampled to its image size)."""
        return checkpoint_filter_fn(state, model)

    def subnet_state_dict(self, net: Supernet, arch: Architecture) -> dict[str, torch.Tensor]:
        """The state dict of `arch`'s subnet, from `net`'s weights: its stem and head, and each kept block's state
        for its choice."""
        state = self.stem_and_head_state(net, arch)
        for i, (block, choice) in enumerate(zip(net.blocks[: arch.depth], arch.blocks, strict=True)):
            state |= prefixed(f"blocks.{i}.", self.block_state(block, choice, arch))
        return state

    def stem_and_head_state(self, net: Supernet, arch: Architecture) -> dict[str, torch.Tensor]:
        """Everything of `net` outside its blocks, as it is."""
        return {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.")}

    def block_state(self, block: nn.Module, choice: BlockChoice, arch: Architecture) -> dict[str, torch.Tensor]:
        """A supernet block's plain-subnet state for `choice`."""
        return block.subnet_state(choice)

    def spvit_costs(self, net: Supernet) -> FormulaCosts | None:
        """The MACs of the `spvit` convention, the SPViT papers' formula for the family's models; None where they
        give none."""
        return None

    def search_space(self, net: Supernet, mixers: Iterable[str], mlp_ratios: Iterable[float]) -> BlockwiseSpace:
        """The Optuna search's discrete space over `net`."""
        return BlockwiseSpace(net, mixers, mlp_ratios)

    # -- the lookup table -------------------------------------------------------------------------

    def table_widths(self, net: Supernet) -> list[int]:
        """The embedding widths a lookup table prices separately (0: the supernet's only one)."""
        return [0]

    def smallest_architecture(self, net: Supernet, width: int) -> Architecture:
        """The dense architecture at `width` (0: the only one), whose blocks the lookup table then empties."""
        return net.dense_architecture()

    def extra_msa_passes(self, net: Supernet, index: int) -> list[tuple[str, int, dict[str, Any]]]:
        """Block `index`'s msa passes that a lookup table prices beyond its msa row: (the row's selector
        `FIELD[i][j]=V`, the pass, its keyword arguments) each. Its msa row is the sum of the passes at the
        supernet's own keyword arguments. None by default."""
        return []


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Make `family` known to the registry, exporter, lookup table and Optuna search; returns it."""
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"family {family.name!r} is registered twice")
    _FAMILIES.append(family)
    _family_of_name.cache_clear()
    return family


def registered_families() -> list[Family]:
    """Every registered family; the plain ViT family, which accepts what no other does, last. The first call
    imports every family's folder (importing a family registers it, and our own models with timm)."""
    for name in FAMILY_NAMES:
        importlib.import_module(f"{__package__}.families.{name}.family")
    return sorted(_FAMILIES, key=lambda f: f.name is None)


def family_of_model(model: nn.Module) -> Family:
    """The family whose timm model `model` is; the ViT family for any other model (which it then refuses)."""
    return next(f for f in registered_families() if f.accepts(model) or f.name is None)


def family_of(net: nn.Module) -> Family:
    """The family of a supernet or subnet."""
    for family in registered_families():
        if isinstance(net, family.supernet_class | family.subnet_class):  # no family's classes derive another's
            return family
    raise ValueError(f"{type(net).__name__} belongs to no registered family")


def family_named(name: str | None) -> Family:
    """The family a subnet config's `family` names (None: ViT)."""
    for family in registered_families():
        if family.name == name:
            return family
    known = ", ".join(repr(f.name) for f in registered_families() if f.name is not None)
    raise ValueError(f"family: unknown subnet family {name!r}; expected {known} or none (ViT)")


@functools.cache
def _family_of_name(model: str) -> Family:
    named = (f for f in registered_families() if f.name is not None and model in f.model_names())
    return next(named, family_named(None))


def family_of_model_name(model: str) -> Family:
    """The family of timm model `model` (by the timm module it is registered in)."""
    return _family_of_name(model)

"""The t2t_vit family; importing it registers it (`family.FAMILY`)."""

from .family import FAMILY

__all__ = ["FAMILY"]

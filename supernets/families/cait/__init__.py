"""The cait family; importing it registers it (`family.FAMILY`)."""

from .family import FAMILY

__all__ = ["FAMILY"]

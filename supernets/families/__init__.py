"""One folder per model family; importing this package registers every family with `supernets.family`."""

from . import cait, sret, t2t_vit, vit

__all__ = ["cait", "sret", "t2t_vit", "vit"]

"""One folder per model family. Pure Python: `supernets.family` imports each family's `family` module (which
registers it) when the families are first asked for, and `supernets.architecture` each one's `schema` module (its
architecture fields, torch-free) when a family field is first read."""

FAMILY_NAMES = ("cait", "sret", "swin", "t2t_vit", "vit")

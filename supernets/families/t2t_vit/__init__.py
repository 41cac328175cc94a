"""The t2t_vit family (`family.py` registers it; `supernets.family.registered_families` imports it)."""

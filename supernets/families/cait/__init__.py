"""The cait family (`family.py` registers it; `supernets.family.registered_families` imports it)."""

"""T2T-ViT's architecture fields, pure Python (the torch-free contract reads them): `embed_dim`, the width used
(num_heads × the supernet's head width), and `num_heads`, the attention heads of every block."""

from __future__ import annotations

from ...architecture import positive_int

ARCHITECTURE_FIELDS = {"embed_dim": positive_int, "num_heads": positive_int}

"""The SPViT paper's cost formula for DeiT/ViT, which reproduces its published MACs.

N patch tokens, T = N + prefix tokens, D width, d head width, p patch size, C classes:
patch embedding N·D·3·p², head D·C, two LayerNorms 2·D·T per block (whatever the choices),
msa 4·T·D² + 2·D·T², bconv1 2·D·d·N, bconv3 (9·D·d + d·D)·N, skip 0, MLP 2·N·D per kept unit.
"""

from __future__ import annotations

from ...family import FormulaCosts
from .supernet import VisionTransformerSupernet


def vit_spvit_costs(net: VisionTransformerSupernet) -> FormulaCosts:
    n = net.grid_size[0] * net.grid_size[1]
    t = n + net.num_prefix_tokens
    dim, patch = net.embed_dim, net.patch_embed.patch_size[0]
    fixed = {"patch_embed": n * dim * net.in_chans * patch * patch, "head": dim * net.num_classes}
    mixers = []
    for block in net.blocks:
        d = block.attn.head_dim
        mixers.append({
            "skip": 0,
            "bconv1": 2 * dim * d * n,
            "bconv3": (9 * dim * d + d * dim) * n,
            "msa": 4 * t * dim * dim + 2 * dim * t * t,
        })  # fmt: skip
    norms = 2 * dim * t  # both LayerNorms of a block, whatever its choices
    return FormulaCosts(fixed, mixers, [norms] * net.depth, [2 * n * dim] * net.depth)

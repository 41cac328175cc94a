"""`T2TViTSubnet`, a T2T-ViT exported for one `Architecture`: the dense T2T-ViT of the architecture's depth,
width and heads, whose blocks hold the chosen mixers and pruned MLPs.

It is built from data alone (the architecture, the supernet's model kwargs), checked against the supernet's
dimensions, which the variant and its kwargs give. It lives apart from `t2t_supernet` because it builds on
`subnet`, which imports the registry, which imports `t2t_supernet`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...architecture import Architecture
from ...base import Subnet, imagenet_data_config
from ...layers.plain import SubnetBlock
from .supernet import validate_t2t_architecture
from .t2t_vit import T2TViT, t2t_vit_variants


class T2TViTSubnet(T2TViT, Subnet):
    """The exported T2T-ViT: our `T2TViT` at `arch.embed_dim`, `arch.num_heads` and `arch.depth`, its blocks
    rebuilt for their choices (`SubnetBlock`). Built on the ambient device: under `torch.device("meta")` it
    allocates nothing that a state dict replaces anyway."""

    family = "t2t_vit"

    def __init__(self, arch: Architecture, model_kwargs: dict[str, Any] | None = None, fold_bn: bool = False) -> None:
        model_kwargs = dict(model_kwargs or {})
        variants = t2t_vit_variants()
        if arch.model not in variants:
            raise ValueError(f"model: '{arch.model}' is not a T2T-ViT; expected one of {', '.join(variants)}")
        supernet = variants[arch.model] | model_kwargs  # the dimensions of the supernet it comes from
        hidden = int(supernet["embed_dim"] * supernet["mlp_ratio"])  # as timm's `Block` sizes its MLP
        validate_t2t_architecture(
            arch,
            model=arch.model,
            img_size=arch.img_size,
            num_classes=arch.num_classes,
            mlp_hidden=[hidden] * supernet["depth"],
            embed_dim=supernet["embed_dim"],
            num_heads=supernet["num_heads"],
        )
        sliced = {"embed_dim": arch.embed_dim, "num_heads": arch.num_heads, "depth": arch.depth}
        try:
            super().__init__(**(supernet | sliced), img_size=arch.img_size, num_classes=arch.num_classes)
        except TypeError as e:  # a model kwarg T2TViT does not take
            raise ValueError(f"model_kwargs: cannot build '{arch.model}' with {model_kwargs}: {e}") from None
        self.record_source(arch, model_kwargs, fold_bn, imagenet_data_config(self.in_chans, arch, crop_pct=0.9))
        grid = self.tokens_to_token.grid_size
        self.blocks = nn.Sequential(
            *[
                SubnetBlock.from_timm(block, choice, grid, self.num_prefix_tokens, fold_bn, arch.skip_mixer)
                for block, choice in zip(self.blocks, arch.blocks, strict=True)
            ]
        )

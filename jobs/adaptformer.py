"""AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", NeurIPS 2022): a timm ViT whose every block has a parallel bottleneck MLP.

    out = x + MLP(LN(x)) + s * up(dropout(ReLU(down(x))))      # beside the block's own MLP branch

``x`` is the block's input after its attention branch (no extra LayerNorm: the paper's ``none``
option), ``s`` a fixed scale (0.1, the paper's default) or a learned scalar (``"learned"``,
initialised to 1). The down-projection starts as ``nn.Linear``'s own (Kaiming-uniform, ``a=sqrt(5)``),
the up-projection and both biases at zero, so at step 0 the model computes exactly its backbone.

An adapter cannot be folded into the backbone's weights, so a model with adapters is its own
architecture: importing this module (``import jobs.models`` does) registers ``adaptformer_vit``
with timm. ``base`` names the timm ViT underneath (its defaults apply, as in
``timm.create_model(base, **kwargs)``); the export's ``config.json`` records it, so
``timm.create_model("local-dir:EXPORT", pretrained=True)`` rebuilds and loads the model. Tensor
names are the base's plus ``blocks.<i>.adapter.{down,up}.{weight,bias}`` (and ``.scale``).
Written for vitforge after reading ShoufaChen/AdaptFormer (``models/adapter.py``, ``vit_video.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models._registry import model_entrypoint
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = ["ParallelAdapter", "AdapterBlock", "adaptformer_vit"]

ARCH = "adaptformer_vit"


class ParallelAdapter(nn.Module):
    """``[N, L, D]`` -> ``[N, L, D]``: ``s * up(dropout(relu(down(x))))``; zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float | str = 0.1, dropout: float = 0.1,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, bottleneck, **dd)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, **dd)
        if scale == "learned":
            self.scale = nn.Parameter(torch.ones(1, **dd))
        else:
            self.register_buffer("scale", torch.tensor(float(scale), **dd), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """AdaptFormer's ``lora`` init (timm's ViT init calls it after its own pass over every Linear)."""
        self.down.reset_parameters()  # kaiming_uniform_(a=sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale


class AdapterBlock(Block):
    """timm's pre-norm ``Block`` with a :class:`ParallelAdapter` beside its MLP branch."""

    def __init__(self, dim: int, *args: Any, adapter_bottleneck: int = 64, adapter_scale: float | str = 0.1,
                 adapter_dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(dim, *args, **kwargs)
        self.adapter = ParallelAdapter(dim, adapter_bottleneck, adapter_scale, adapter_dropout,
                                       device=kwargs.get("device"), dtype=kwargs.get("dtype"))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)  # adapter outside drop path


def adapter_model_args(base: str, model_args: dict[str, Any], bottleneck: int, scale: float | str,
                       dropout: float) -> dict[str, Any]:
    """``model_args`` of ``base`` turned into ``adaptformer_vit``'s (JSON-able: what an export records).
    ``base`` may itself be ``adaptformer_vit`` (an adapter export, adapted further): its base is kept."""
    if base == ARCH:
        base = model_args["base"]
        model_args = {k: v for k, v in model_args.items() if k != "base" and not k.startswith("adapter_")}
    return {"base": base, "adapter_bottleneck": bottleneck, "adapter_scale": scale, "adapter_dropout": dropout,
            **model_args}


# read by timm's register_model: what create_model resolves the name to (weights come from an export)
default_cfgs = generate_default_cfgs({ARCH: {"url": "", "num_classes": 0, "input_size": (3, 224, 224),
                                             "interpolation": "bicubic", "crop_pct": 0.875,
                                             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                             "first_conv": "patch_embed.proj", "classifier": "head"}})


@register_model
def adaptformer_vit(pretrained: bool = False, base: str = "vit_base_patch16_224", adapter_bottleneck: int = 64,
                    adapter_scale: float | str = 0.1, adapter_dropout: float = 0.1, **kwargs: Any) -> VisionTransformer:
    """The timm ViT ``base`` (with ``kwargs``) built with :class:`AdapterBlock` s; ``pretrained`` loads the
    ``pretrained_cfg`` timm passes (an export's weights)."""
    block = functools.partial(AdapterBlock, adapter_bottleneck=adapter_bottleneck, adapter_scale=adapter_scale,
                              adapter_dropout=adapter_dropout)
    model = model_entrypoint(base)(pretrained=pretrained, block_fn=block, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"adaptformer_vit: base {base!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model

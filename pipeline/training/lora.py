"""Low-rank adapters (LoRA): W x + (alpha / r) B A x, with W frozen and only A, B trained.

B starts at zero, so an adapted model begins exactly as its base. Before evaluation
and export the adapters are merged, W <- W + (alpha / r) B A: the result is a plain
GPT, so the ONNX graph and the runtime do not know adapters ever existed.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from pipeline.model import GPT


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear draws its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_a.t()) @ self.lora_b.t()  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain Linear with the adapter folded into its weight."""
        out = copy.deepcopy(self.base)
        out.weight += self.scale * (self.lora_b @ self.lora_a)  # (out, r) @ (r, in)
        out.weight.requires_grad_(True)
        return out


# The matrices of every block that get an adapter: attention's qkv and output, the MLP's two.
TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc"), ("mlp", "proj"))


def add_adapters(model: GPT, rank: int, alpha: float) -> GPT:
    """Wrap every block's matrices in LoRALinear, in place; the rest of the model is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for parent, name in TARGETS:
            owner = getattr(block, parent)
            setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha))
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_adapters(model: GPT) -> GPT:
    """A copy of ``model`` with every adapter merged: a plain GPT whose logits match."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        for parent, name in TARGETS:
            owner = getattr(block, parent)
            layer = getattr(owner, name)
            if isinstance(layer, LoRALinear):
                setattr(owner, name, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model

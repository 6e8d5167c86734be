"""Optimizers and the learning-rate schedule.

``train.optimizer``: AdamW for everything, or Muon for the hidden matrices and AdamW for
the rest. Muon orthogonalises each hidden matrix's momentum (Newton-Schulz) so that
every direction of the update moves at the same rate; it is meant for the 2-D weights
inside the transformer blocks only. Embeddings, the output head, the n-gram tables and
the norm gains stay with AdamW.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from pipeline.params import TrainParams


class Optimizers:
    """Several optimizers stepped as one.

    Every parameter group remembers its ``base_lr``; the schedule sets each group's
    ``lr`` to ``base_lr * factor``, so Muon's and AdamW's rates keep their ratio.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"expected {len(self.optimizers)} optimizer states, got {len(states)}")
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def make_optimizer(model: nn.Module, t: TrainParams, device: torch.device) -> Optimizers:
    """``train.optimizer``: ``adamw``, or ``muon`` for the blocks' matrices plus AdamW for the rest."""
    fused = device.type in ("cpu", "cuda")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Low-rank adapters (fine-tuning) stay with AdamW: B starts at zero, and Muon's
    # orthogonalised step would give it full-size updates from the first step.
    adapters = [p for n, p in named if ".lora_" in n]
    named = [(n, p) for n, p in named if ".lora_" not in n]
    hidden = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
    tables = [p for n, p in named if n.startswith("ngram.")]
    gains = [p for p in (p for _, p in named) if p.dim() < 2]
    if t.optimizer == "adamw":
        matrices = [p for n, p in named if p.dim() >= 2 and not n.startswith("ngram.")]
        adam_groups = [{"params": matrices, "weight_decay": t.weight_decay}]
    else:
        embeddings = [p for n, p in named if p.dim() >= 2 and not n.startswith(("blocks.", "ngram."))]
        adam_groups = [{"params": embeddings, "weight_decay": t.weight_decay}]
    adam_groups += [
        # Each n-gram row is touched by few characters: decay would erase the rare ones.
        {"params": tables, "weight_decay": 0.0},
        {"params": gains, "weight_decay": 0.0},
        {"params": adapters, "weight_decay": 0.0},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    ]
    if t.optimizer == "muon" and hidden:  # none when fine-tuning with every block frozen
        # torch's Muon scales the step by sqrt(max(1, rows / cols)) (Keller Jordan's rule)
        # and decays weights by lr * weight_decay per step: its default of 0.1 is far
        # too strong at lr 0.02-0.05 over a short run, so it is a param here.
        optimizers.append(torch.optim.Muon(
            hidden, lr=t.muon_lr, momentum=t.muon_momentum, weight_decay=t.muon_weight_decay,
            nesterov=True, adjust_lr_fn="original",
        ))
    return Optimizers(optimizers)


def lr_factor(step: int, t: TrainParams) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): warmup, then decay to min_lr."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    floor = t.min_lr / t.lr
    if t.schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # Warmup-stable-decay: hold the peak, then fall linearly over the last decay_frac of the run.
    progress = min(1.0, (step - decay_start(t)) / max(1, t.max_steps - decay_start(t)))
    return 1.0 if step < decay_start(t) else 1.0 - (1.0 - floor) * progress


def decay_start(t: TrainParams) -> int:
    """The step where the last ``decay_frac`` of the run begins (wsd's cool-down, the EMA's start)."""
    return max(t.warmup_steps, t.max_steps - round(t.decay_frac * t.max_steps))

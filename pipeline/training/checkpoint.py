"""Checkpoints: plain dicts of tensors and numbers, saved atomically, loaded with weights_only.

``best.pt`` holds the weights with the lowest validation loss; ``last.pt`` adds the
optimizer state, the weight average and the RNG state so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from chargen.errors import ChargenError
from chargen.tokenizers import Tokenizer, TokenizerError, from_description
from pipeline.files import atomic_file
from pipeline.model import GPT, GPTConfig

FORMAT = 2  # bump when the dict layout changes; older files are then refused clearly
LAST = "last.pt"  # the latest state, with what resuming needs
BEST = "best.pt"  # the weights with the lowest validation loss


class CheckpointError(ChargenError):
    """A checkpoint file is missing, corrupt or from an incompatible version."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous file intact)."""
    with atomic_file(path, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict; raise CheckpointError with what to do when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint found; run the train stage first (dvc repro train)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: corrupt or not a chargen checkpoint ({_clip(first)}); delete it and re-run training"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: checkpoint format {found!r} is not the supported {FORMAT}; delete it and re-run training"
        )
    for key in ("model", "model_config", "tokenizer", "step"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'; delete it and re-run training")
    return state


def build_model(state: dict[str, Any], path: str | Path = "checkpoint") -> GPT:
    """A GPT with the checkpoint's config and weights."""
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit this version's model ({_clip(first)}); re-run training"
        ) from None
    return model


def checkpoint_tokenizer(state: dict[str, Any], path: str | Path = "checkpoint") -> Tokenizer:
    """The tokenizer the checkpoint's model was trained with."""
    try:
        return from_description(state["tokenizer"])
    except TokenizerError as e:
        raise CheckpointError(f"{path}: {e}; re-run training") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load ``(model in eval mode, tokenizer, info)``; info holds step, losses and params."""
    state = load_checkpoint(path, map_location=device)
    model = build_model(state, path).to(device).eval()
    skip = {"model", "optimizer", "ema", "rng"}
    info = {k: v for k, v in state.items() if k not in skip}
    return model, checkpoint_tokenizer(state, path), info


def run_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts: runs with the same hash may resume each other."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _clip(text: str, limit: int = 120) -> str:
    """``text`` cut at a word boundary to about ``limit`` characters, marked with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."

"""Fine-tuning: start training from a trained chargen checkpoint (the base) instead of from scratch.

The base's tokenizer is kept. Characters of the new corpus it lacks either map to the
unknown token or extend the vocabulary (``finetune.new_chars``); new rows of the token
embedding start at the mean of the trained rows, new rows of the bigram table at zero
(as every row of a fresh table). The hashed trigram table cannot grow: every bucket
depends on the vocabulary size, so extension is refused for a base that has one.
``finetune.method`` chooses what trains: everything, the upper blocks only, or
low-rank adapters (merged before anything is written, see :mod:`pipeline.training.lora`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chargen.errors import ChargenError
from chargen.tokenizers import CharTokenizer
from pipeline.model import GPT, GPTConfig
from pipeline.params import FinetuneParams, ModelParams, TrainParams
from pipeline.training.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_tokenizer,
    load_checkpoint,
)
from pipeline.training.lora import add_adapters

# Model params that only change training, not the weights' shapes or meaning.
_NOT_ARCHITECTURE = ("dropout",)
# Train keys a fine-tuning run takes from the finetune section instead.
_OVERRIDES = ("lr", "min_lr", "muon_lr", "warmup_steps", "max_steps", "eval_interval")


class FinetuneError(ChargenError):
    """The base checkpoint cannot be fine-tuned with these params or this data."""


@dataclass(frozen=True)
class Base:
    """A trained checkpoint to start from."""

    path: Path
    state: dict[str, Any]
    tokenizer: CharTokenizer
    sha256: str

    @property
    def config(self) -> GPTConfig:
        return GPTConfig(**self.state["model_config"])

    def origin(self, f: FinetuneParams, tokenizer: CharTokenizer) -> dict[str, Any]:
        """What the model file records about where its weights came from."""
        return {
            "init_from": self.path.as_posix(), "base_sha256": self.sha256, "base_step": int(self.state["step"]),
            "method": f.method, "new_chars": f.new_chars,
            "added_chars": "".join(tokenizer.tokens[self.tokenizer.size:]),
        }


def load_base(init_from: str | Path) -> Base:
    """The checkpoint named by ``finetune.init_from``; a one-line error when it is unusable."""
    path = Path(init_from)
    if not path.is_file():
        raise FinetuneError(
            f"finetune.init_from: {path} not found; copy a trained checkpoint there (e.g. checkpoints/best.pt)"
        )
    try:
        state = load_checkpoint(path)
        build_model(state, path)
        tokenizer = checkpoint_tokenizer(state, path)
    except CheckpointError as e:
        reason = str(e).split("; ")[0]
        raise FinetuneError(f"finetune.init_from: {reason}; point it at a checkpoint the train stage wrote") from None
    if not isinstance(tokenizer, CharTokenizer):
        raise FinetuneError(f"finetune.init_from: {path} has a {tokenizer.kind!r} tokenizer; only char is supported")
    return Base(path, state, tokenizer, hashlib.sha256(path.read_bytes()).hexdigest())


def check_architecture(base: Base, m: ModelParams) -> None:
    """Refuse a base whose shape differs from the ``model`` params, naming every difference."""
    have = base.state["model_config"]
    want = {k: v for k, v in dataclasses.asdict(m).items() if k not in _NOT_ARCHITECTURE}
    diff = [k for k, v in want.items() if have.get(k) != v]
    if diff:
        got = ", ".join(f"{k}={have.get(k)!r}" for k in diff)
        asked = ", ".join(f"{k}={want[k]!r}" for k in diff)
        raise FinetuneError(
            f"finetune.init_from: {base.path} is a model with {got} but params.yaml asks for {asked}; "
            "set the model section to the base's shape"
        )


# --------------------------------------------------------------------------- vocabulary


def finetune_tokenizer(base: Base, char_counts: np.ndarray, new_chars: str, normalize_nfc: bool) -> CharTokenizer:
    """The base tokenizer, extended by the corpus's unseen characters when ``new_chars`` is extend.

    ``char_counts`` counts each code point of the new corpus. New characters are listed
    in a warning either way; extension appends them after the base's tokens.
    """
    tok = base.tokenizer
    if tok.normalize_nfc != normalize_nfc:
        raise FinetuneError(
            f"encode.normalize_nfc is {normalize_nfc} but the base model was trained with {tok.normalize_nfc}; "
            "set encode.normalize_nfc to match"
        )
    known = {t for i, t in enumerate(tok.tokens) if i not in (tok.eot_id, tok.unk_id)}
    present = np.nonzero(char_counts)[0]
    missing = [chr(c) for c in present if chr(c) not in known]
    if not missing:
        return tok
    share = char_counts[[ord(c) for c in missing]].sum() / max(1, char_counts.sum())
    listed = "".join(missing)
    action = "they extend the vocabulary" if new_chars == "extend" else "they map to the unknown token"
    print(f"warning: the base model lacks {len(missing)} characters of the corpus ({share:.2%} of it): "
          f"{listed!r}; {action} (finetune.new_chars: {new_chars})", file=sys.stderr)
    if new_chars == "unk":
        return tok
    if base.config.trigram_buckets:
        raise FinetuneError(
            f"finetune.new_chars: extend cannot grow {base.path}'s hashed trigram table (every bucket depends "
            "on the vocabulary size); use new_chars: unk, or a base trained with model.trigram_buckets: 0"
        )
    return CharTokenizer([*tok.tokens, *missing], eot_id=tok.eot_id, unk_id=tok.unk_id,
                         normalize_nfc=tok.normalize_nfc)


def check_tokenizer(base: Base, tokenizer: CharTokenizer, encoded_dir: str | Path) -> None:
    """The encoded data must use the base's tokens first: what the encode stage writes for this base."""
    tok = base.tokenizer
    ok = (isinstance(tokenizer, CharTokenizer) and tokenizer.tokens[: tok.size] == tok.tokens
          and (tokenizer.eot_id, tokenizer.unk_id, tokenizer.normalize_nfc) == (tok.eot_id, tok.unk_id,
                                                                               tok.normalize_nfc))
    if not ok:
        raise FinetuneError(
            f"{encoded_dir} was not encoded with {base.path}'s tokenizer; re-run the encode stage (dvc repro encode)"
        )


@torch.no_grad()
def grow_vocabulary(state: dict[str, torch.Tensor], old: GPTConfig, new_size: int) -> dict[str, torch.Tensor]:
    """The base weights for a vocabulary of ``new_size`` >= old.vocab_size tokens (new ids last)."""
    V, W = old.vocab_size, new_size
    if W == V:
        return state
    state = dict(state)
    for key in ("wte.weight", "lm_head.weight"):
        if key in state:
            rows = state[key]  # (V, C)
            state[key] = torch.cat((rows, rows.mean(0, keepdim=True).expand(W - V, -1)))  # (W, C)
    if "ngram.bigram.weight" in state:
        old_table = state["ngram.bigram.weight"]  # ((V + 1) * V, C): row prev * V + cur, prev V = none
        table = old_table.new_zeros(((W + 1) * W, old_table.shape[1]))
        prev = torch.arange(V + 1)
        new_prev = torch.where(prev == V, W, prev)  # "no token" moves to the new end
        rows = (new_prev[:, None] * W + torch.arange(V)[None, :]).flatten()  # ((V + 1) * V,)
        table[rows] = old_table
        state["ngram.bigram.weight"] = table
    return state


# --------------------------------------------------------------------------- the model


def finetune_train_params(t: TrainParams, f: FinetuneParams) -> TrainParams:
    """The train params with the finetune section's rates, warm-up, length and validation interval."""
    return dataclasses.replace(t, **{k: getattr(f, k) for k in _OVERRIDES})


def initial_model(base: Base, cfg: GPTConfig, f: FinetuneParams) -> GPT:
    """The model fine-tuning starts from: the base's weights, its vocabulary grown to ``cfg``,
    with what ``finetune.method`` keeps fixed frozen (or adapters added)."""
    model = base_model(base, cfg).train()
    extended = cfg.vocab_size > base.config.vocab_size
    if f.method == "lora":
        add_adapters(model, f.lora_rank, f.lora_alpha)
    elif f.method == "freeze":
        if f.freeze_layers > cfg.n_layer:
            raise FinetuneError(f"finetune.freeze_layers: {f.freeze_layers} exceeds model.n_layer ({cfg.n_layer})")
        frozen = [model.wte, *([model.ngram] if model.ngram is not None else []),
                  *([model.wpe] if model.wpe is not None else []), *model.blocks[: f.freeze_layers]]
        for module in frozen:
            module.requires_grad_(False)
    if extended:
        model.wte.weight.requires_grad_(True)  # the new characters' rows must learn
    return model


def base_model(base: Base, cfg: GPTConfig) -> GPT:
    """The base model as it is, its vocabulary grown to ``cfg``'s: what zero-shot measures."""
    model = GPT(cfg)
    model.load_state_dict(grow_vocabulary(base.state["model"], base.config, cfg.vocab_size))
    return model.eval()

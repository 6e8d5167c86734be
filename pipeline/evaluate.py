"""Evaluate the best checkpoint: loss on the whole test split, spelling rate, before/after samples.

The loss uses the windows of :mod:`pipeline.scoring` (float32, no autocast), so the
ONNX compare stage reproduces it. Samples are drawn with the KV cache from the
trained model and from the untrained initialisation (the same seed as training).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.atomic import write_json, write_text
from pipeline.batches import read_split
from pipeline.checkpoint import build_model, load_checkpoint
from pipeline.device import pick_device
from pipeline.model import GPT, GPTConfig
from pipeline.params import Params
from pipeline.scoring import score_batches, summarize
from pipeline.spelling import spelling_rate, training_words


@torch.no_grad()
def split_loss(model: GPT, ids: np.ndarray, batch_size: int, device: torch.device) -> dict[str, float | int]:
    """Loss, bits per character and perplexity of a whole token array (scoring windows)."""
    model.eval()
    total, count = 0.0, 0
    for x, y, mask in score_batches(ids, model.cfg.block_size, batch_size):
        logits, _ = model(torch.from_numpy(x).to(device))  # (B, L, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), torch.from_numpy(y).to(device), reduction="none")  # (B, L)
        m = torch.from_numpy(mask).to(device)
        total += nll[m].double().sum().item()
        count += int(m.sum().item())
    return summarize(total, count)


def encode_prompt(prompt: str, vocab: dict[str, Any]) -> list[int]:
    index = {t: i for i, t in enumerate(vocab["tokens"])}
    ids = [index.get(ch, vocab["unk_id"]) for ch in prompt]
    return ids or [vocab["eot_id"]]  # an empty prompt starts like a new document


def decode(ids: list[int], vocab: dict[str, Any]) -> str:
    """Token ids to text; the special tokens show as a line break."""
    tokens = vocab["tokens"]
    special = {vocab["eot_id"], vocab["unk_id"]}
    return "".join("\n" if i in special else tokens[i] for i in ids)


@torch.no_grad()
def draw_samples(model: GPT, vocab: dict[str, Any], prompt: str, num_samples: int, chars: int,
                 temperature: float, top_k: int, seed: int, device: torch.device) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (without it), ``chars`` characters each."""
    model.eval()
    idx = torch.tensor([encode_prompt(prompt, vocab)], device=device).repeat(num_samples, 1)  # (N, Tp)
    gen = torch.Generator(device=device).manual_seed(seed)
    threads = torch.get_num_threads()
    # One new token per step is too small a job to split: on CPU, extra threads only
    # wait on each other (measured 60x slower with 2 threads on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        out = model.generate(idx, chars, temperature=temperature, top_k=top_k, generator=gen)  # (N, chars)
    finally:
        torch.set_num_threads(threads)
    return [decode(row, vocab) for row in out.tolist()]


def evaluate(params: Params, checkpoint: str | Path, encoded_dir: str | Path) -> dict[str, Any]:
    """Metrics and samples of ``checkpoint``: ``{"metrics", "trained", "untrained"}``."""
    s, e = params.sample, params.evaluate
    device = pick_device("auto")
    state = load_checkpoint(checkpoint, map_location=device)
    model = build_model(state, checkpoint).to(device)
    vocab = state["vocab"]

    test = summarize_named("test", split_loss(model, read_split(encoded_dir, "test"), e.batch_size, device))

    words = training_words(encoded_dir)
    sample_args = (vocab, s.prompt, s.num_samples, s.chars, s.temperature, s.top_k, s.seed, device)
    trained = draw_samples(model, *sample_args)
    seed = int(state.get("params", {}).get("train", {}).get("seed", 0))
    torch.manual_seed(seed)  # the initialisation training started from
    untrained_model = GPT(GPTConfig(**state["model_config"])).to(device)
    untrained = draw_samples(untrained_model, *sample_args)

    val_loss = float(state.get("best_val_loss", math.nan))
    metrics = {
        **test,
        # The validation split is scored during training on fixed windows; scoring all of
        # it again would double this stage's time for a number that tracks test_loss.
        "val_loss": val_loss,
        "val_bpc": val_loss / math.log(2),
        "spelling_rate": spelling_rate(trained, words),
        "spelling_rate_untrained": spelling_rate(untrained, words),
        "num_params": model.num_params(),
        "step": int(state["step"]),
        "train_seconds": float(state.get("train_seconds", math.nan)),
        "sample_chars": s.chars,
        "sample_count": s.num_samples,
        "sample_temperature": s.temperature,
    }
    return {"metrics": metrics, "trained": trained, "untrained": untrained}


def summarize_named(prefix: str, m: dict[str, float | int]) -> dict[str, float | int]:
    return {f"{prefix}_{k}": v for k, v in m.items()}


def samples_markdown(result: dict[str, Any], params: Params) -> str:
    """Before/after samples side by side, one table row per seed-ordered sample."""
    s, m = params.sample, result["metrics"]

    def cell(text: str) -> str:
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        return esc.replace("\n", "<br>")

    lines = [
        "# Samples before and after training",
        "",
        f"Prompt `{s.prompt}`, {s.chars} characters per sample, temperature {s.temperature}, "
        f"top-k {s.top_k or 'off'}, sampling seed {s.seed}. The untrained model is the "
        "initialisation training started from.",
        "",
        f"| | untrained (step 0) | trained (step {m['step']}) |",
        "|---|---|---|",
        f"| spelling rate | {m['spelling_rate_untrained']:.1%} | {m['spelling_rate']:.1%} |",
        f"| test loss (nats/char) | | {m['test_loss']:.4f} |",
    ]
    for i, (before, after) in enumerate(zip(result["untrained"], result["trained"], strict=True)):
        lines.append(f"| sample {i + 1} | {cell(s.prompt + before)} | {cell(s.prompt + after)} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], params: Params, samples_path: str | Path = "reports/samples.md") -> None:
    """Write metrics JSON and the samples report, each atomically."""
    write_json(params.evaluate.out, result["metrics"])
    write_text(samples_path, samples_markdown(result, params))

"""Evaluate the best checkpoint: loss on the whole test split, spelling rate, before/after samples.

The loss uses the windows of :mod:`chargen.scoring` (float32, no autocast), so the
ONNX compare stage reproduces it. Samples are drawn with the KV cache from the
trained model and from the untrained initialisation (the same seed as training).
Nothing here depends on time, so the same checkpoint always gives the same metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chargen.arithmetic import (
    Problem,
    accuracy_report,
    answer_budget,
    answer_text,
    by_prompt_length,
    prompt_ids,
)
from chargen.scoring import score_batches, scored_chars, summarize
from chargen.spelling import LONG_WORD, spelling_rate
from chargen.tokenizers import Tokenizer
from pipeline.evaluation.arithmetic import heldout_problems, trained_digits
from pipeline.evaluation.words import training_words
from pipeline.files import write_json, write_text
from pipeline.model import GPT, GPTConfig, cross_entropy
from pipeline.params import SampleParams
from pipeline.tokens.splits import read_scored_split
from pipeline.training.checkpoint import build_model, checkpoint_tokenizer, load_checkpoint
from pipeline.training.device import pick_device
from pipeline.training.finetune import base_model, load_base


@torch.no_grad()
def split_loss(
    model: GPT, ids: np.ndarray, chars_per_token: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, float | int]:
    """Loss per token and per character, bits per character and perplexity of a whole
    token array (scoring windows); ``chars_per_token`` from ``Tokenizer.chars_per_token``."""
    model.eval()
    total, count = 0.0, 0
    for x, y, mask in score_batches(ids, model.cfg.block_size, batch_size):
        logits, _ = model(torch.from_numpy(x).to(device))  # (B, L, V)
        nll = cross_entropy(logits, torch.from_numpy(y).to(device), reduction="none")  # (B, L)
        m = torch.from_numpy(mask).to(device)
        total += nll[m].double().sum().item()
        count += int(m.sum().item())
    return summarize(total, count, scored_chars(ids, chars_per_token))


@torch.no_grad()
def draw_samples(model: GPT, tokenizer: Tokenizer, s: SampleParams, device: torch.device) -> list[str]:
    """``s.num_samples`` continuations of ``s.prompt`` (without it), ``s.chars`` characters
    each, decoded with the end-of-text token shown as a line break."""
    model.eval()
    prompt = tokenizer.encode(s.prompt).tolist() or [tokenizer.eot_id]  # "" starts a new document
    idx = torch.tensor([prompt], device=device).repeat(s.num_samples, 1)  # (N, Tp)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    rows: list[list[int]] = [[] for _ in range(s.num_samples)]
    texts = [""] * s.num_samples
    threads = torch.get_num_threads()
    # One new token per step is too small a job to split: on CPU, extra threads only
    # wait on each other (measured 60x slower with 2 threads on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        # A token stands for one character, several, or part of one: sample until every
        # text runs past s.chars characters, so that its first s.chars are all complete.
        while (missing := s.chars + 1 - min(map(len, texts))) > 0:
            out = model.generate(idx, missing, temperature=s.temperature, top_k=s.top_k, generator=gen)  # (N, missing)
            idx = torch.cat((idx, out), dim=1)
            for row, new in zip(rows, out.tolist(), strict=True):
                row.extend(new)
            texts = [tokenizer.decode(row, eot="\n") for row in rows]
    finally:
        torch.set_num_threads(threads)
    return [text[: s.chars] for text in texts]


@torch.no_grad()
def greedy_answers(model: GPT, tokenizer: Tokenizer, problems: list[Problem], batch_size: int,
                   device: torch.device) -> list[str | None]:
    """Every problem asked as a new record and answered by decoding greedily (top-k 1),
    prompts of one length per batch."""
    model.eval()
    answers: list[str | None] = [None] * len(problems)
    for indices in by_prompt_length(problems).values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = torch.from_numpy(np.stack([prompt_ids(problems[i], tokenizer) for i in chunk]))  # (B, T)
            budget = answer_budget([problems[i] for i in chunk])
            out = model.generate(prompts.to(device), budget, top_k=1)  # (B, budget)
            for i, row in zip(chunk, out.tolist(), strict=True):
                answers[i] = answer_text(row, tokenizer)
    return answers


def arithmetic_metrics(model: GPT, tokenizer: Tokenizer, encoded_dir: str | Path, batch_size: int,
                       device: torch.device) -> dict[str, Any]:
    """``{"arithmetic": accuracy report}`` on the held-out problems; ``{}`` when there are none."""
    problems = heldout_problems(encoded_dir)
    if not problems:
        return {}
    answers = greedy_answers(model, tokenizer, problems, batch_size, device)
    return {"arithmetic": accuracy_report(problems, answers, trained_digits(encoded_dir))}


def evaluate(checkpoint: str | Path, encoded_dir: str | Path, s: SampleParams, batch_size: int,
             init_from: str = "") -> dict[str, Any]:
    """Metrics and samples of ``checkpoint``: ``{"metrics", "trained", "untrained"}``.

    With ``init_from`` set (a fine-tuned checkpoint), the base model is measured on the
    same data too (``zero_shot_*`` metrics) and its samples are the "before" ones.
    """
    device = pick_device("auto")
    state = load_checkpoint(checkpoint, map_location=device)
    model = build_model(state, checkpoint).to(device)
    tokenizer = checkpoint_tokenizer(state, checkpoint)

    test_ids = read_scored_split(encoded_dir, tokenizer)
    test = summarize_named("test", split_loss(model, test_ids, tokenizer.chars_per_token(), batch_size, device))

    words = training_words(encoded_dir)
    trained = draw_samples(model, tokenizer, s, device)
    seed = int(state.get("params", {}).get("train", {}).get("seed", 0))
    torch.manual_seed(seed)  # the initialisation training started from
    untrained_model = GPT(GPTConfig(**state["model_config"])).to(device)
    untrained = draw_samples(untrained_model, tokenizer, s, device)

    chars_per_token = test["test_chars"] / test["test_tokens"]
    metrics = {
        **test,
        # The validation split is scored during training on fixed windows; scoring all of
        # it again would double this stage's time for a number that tracks test_loss.
        "val_loss": float(state.get("best_val_loss", math.nan)),
        "val_bpc": float(state.get("best_val_bpc", math.nan)),
        "chars_per_token": chars_per_token,  # over the test split
        # The context is block_size tokens: this many characters of test text on average.
        "context_chars": model.cfg.block_size * chars_per_token,
        "spelling_rate": spelling_rate(trained, words),
        "spelling_rate_4plus": spelling_rate(trained, words, min_letters=LONG_WORD),
        "spelling_rate_untrained": spelling_rate(untrained, words),
        "num_params": model.num_params(),
        "step": int(state["step"]),
        "sample_chars": s.chars,
        "sample_count": s.num_samples,
        "sample_temperature": s.temperature,
        **arithmetic_metrics(model, tokenizer, encoded_dir, batch_size, device),
    }
    before = "untrained"
    if init_from:
        base = base_model(load_base(init_from), model.cfg).to(device)
        untrained = draw_samples(base, tokenizer, s, device)
        zero_shot = split_loss(base, test_ids, tokenizer.chars_per_token(), batch_size, device)
        metrics.update({
            "zero_shot_test_loss": zero_shot["loss"], "zero_shot_test_nats_per_char": zero_shot["nats_per_char"],
            "zero_shot_test_bpc": zero_shot["bpc"],
            "zero_shot_spelling_rate": spelling_rate(untrained, words),
            "zero_shot_spelling_rate_4plus": spelling_rate(untrained, words, min_letters=LONG_WORD),
        })
        before = "base"
    return {"metrics": metrics, "trained": trained, "untrained": untrained, "before": before}


def summarize_named(prefix: str, m: dict[str, float | int]) -> dict[str, float | int]:
    return {f"{prefix}_{k}": v for k, v in m.items()}


def samples_markdown(result: dict[str, Any], s: SampleParams) -> str:
    """Before/after samples side by side, one table row per seed-ordered sample."""
    m = result["metrics"]

    def cell(text: str) -> str:
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        return esc.replace("\n", "<br>")

    settings = (f"Prompt `{s.prompt}`, {s.chars} characters per sample, temperature {s.temperature}, "
                f"top-k {s.top_k or 'off'}, sampling seed {s.seed}. The context window holds "
                f"{m['context_chars']:.0f} characters of test text on average "
                f"({m['chars_per_token']:.2f} characters per token).")
    if result.get("before") == "base":
        lines = [
            "# Samples before and after fine-tuning",
            "",
            f"{settings} Before is the base model fine-tuning started from, on this corpus's data.",
            "",
            f"| | base (zero-shot) | fine-tuned (step {m['step']}) |",
            "|---|---|---|",
            f"| spelling rate | {m['zero_shot_spelling_rate']:.1%} | {m['spelling_rate']:.1%} |",
            f"| test loss (nats/char) | {m['zero_shot_test_nats_per_char']:.4f} | {m['test_nats_per_char']:.4f} |",
        ]
    else:
        lines = [
            "# Samples before and after training",
            "",
            f"{settings} The untrained model is the initialisation training started from.",
            "",
            f"| | untrained (step 0) | trained (step {m['step']}) |",
            "|---|---|---|",
            quality_row(m),
            f"| test loss (nats/char) | | {m['test_nats_per_char']:.4f} |",
        ]
    for i, (before, after) in enumerate(zip(result["untrained"], result["trained"], strict=True)):
        lines.append(f"| sample {i + 1} | {cell(s.prompt + before)} | {cell(s.prompt + after)} |")
    return "\n".join(lines) + "\n"


def quality_row(m: dict[str, Any]) -> str:
    """Held-out accuracy for a corpus of equations (spelling means nothing there), else spelling."""
    if "arithmetic" in m:
        return f"| held-out accuracy (exact answers) | | {m['arithmetic']['accuracy']:.1%} |"
    return f"| spelling rate | {m['spelling_rate_untrained']:.1%} | {m['spelling_rate']:.1%} |"


def write_outputs(result: dict[str, Any], s: SampleParams, metrics_path: str | Path,
                  samples_path: str | Path) -> None:
    """Write metrics JSON and the samples report, each atomically."""
    write_json(metrics_path, result["metrics"])
    write_text(samples_path, samples_markdown(result, s))

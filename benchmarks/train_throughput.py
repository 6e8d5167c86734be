"""Training throughput (tokens/s of forward + backward + optimizer step) for one model config and dtype.

The config is params.yaml's ``model`` and ``train`` sections, with the flags given
overriding them. Random tokens, so no data is needed. Prints one JSON object, e.g.
    python -m benchmarks.train_throughput
    python -m benchmarks.train_throughput --n-layer 4 --n-embd 128 --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.options import non_negative_int, positive_int
from pipeline.model import GPT, GPTConfig
from pipeline.params import ModelParams, TrainParams, load_params
from pipeline.stage import run_stage
from pipeline.training.device import autocast, pick_device, pick_dtype, set_threads
from pipeline.training.optim import make_optimizer
from pipeline.training.train import model_loss

# flag -> (section, key); a flag left out keeps params.yaml's value
OVERRIDES = {
    "n_layer": ("model", "n_layer"), "n_head": ("model", "n_head"), "n_embd": ("model", "n_embd"),
    "block_size": ("model", "block_size"), "mlp": ("model", "mlp"), "pos_encoding": ("model", "pos_encoding"),
    "qk_norm": ("model", "qk_norm"), "batch_size": ("train", "batch_size"), "dtype": ("train", "dtype"),
    "device": ("train", "device"), "threads": ("train", "threads"), "compile": ("train", "compile"),
    "optimizer": ("train", "optimizer"), "bigram": ("model", "bigram"),
    "trigram_buckets": ("model", "trigram_buckets"),
}


def measure(m: ModelParams, t: TrainParams, vocab_size: int, warmup: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` training steps of the model ``m`` with the settings ``t`` (after
    ``warmup`` untimed ones) on random tokens: the speed does not depend on the data."""
    set_threads(t.threads)
    device = pick_device(t.device)
    dtype = pick_dtype(t.dtype, device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_params(m, vocab_size)).to(device)
    opt = make_optimizer(model, t, device)
    step_model = torch.compile(model) if t.compile else model
    x = torch.randint(0, vocab_size, (t.batch_size, m.block_size), device=device)  # (B, T)
    y = torch.randint(0, vocab_size, (t.batch_size, m.block_size), device=device)  # (B, T)

    def step() -> None:
        with autocast(device, dtype):
            loss = model_loss(step_model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    # CPU seconds of this process: on a shared machine, tokens per CPU second with one
    # thread is what a quiet machine would give per core; wall time is not.
    cpu = time.process_time() - c0
    tokens = steps * t.batch_size * m.block_size
    return {
        "params": model.num_params(), "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "warmup_s": round(warmup_s, 2),
        "steps_per_s": steps / elapsed,
        "tokens_per_s": round(tokens / elapsed),
        "tokens_per_cpu_s": round(tokens / cpu),
        "loadavg_1m": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--vocab-size", type=positive_int, default=86)
    ap.add_argument("--mlp", choices=["gelu", "relu2", "swiglu"])
    ap.add_argument("--pos-encoding", choices=["rope", "learned"])
    ap.add_argument("--qk-norm", action=argparse.BooleanOptionalAction)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--optimizer", choices=["adamw", "muon"])
    ap.add_argument("--bigram", action=argparse.BooleanOptionalAction)
    ap.add_argument("--trigram-buckets", type=int)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="torch.compile the model (compile time reported apart)")
    ap.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=positive_int, default=20, help="timed steps")
    a = ap.parse_args()
    params = load_params(a.params)
    sections = {"model": {}, "train": {}}
    for flag, (section, key) in OVERRIDES.items():
        if getattr(a, flag) is not None:
            sections[section][key] = getattr(a, flag)
    m, t = replace(params.model, **sections["model"]), replace(params.train, **sections["train"])

    print(json.dumps({
        "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
        "batch_size": t.batch_size, "mlp": m.mlp, "qk_norm": m.qk_norm, "compile": t.compile,
        **measure(m, t, a.vocab_size, a.warmup, a.steps),
    }))


if __name__ == "__main__":
    run_stage(main)

"""Training throughput (tokens/s of forward + backward + AdamW) for one model config and dtype.

Random tokens, so no data is needed. Prints one JSON object, e.g.
    python benchmarks/train_throughput.py --n-layer 4 --n-embd 128 --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pipeline.device import autocast, pick_device, pick_dtype, set_threads
from pipeline.model import GPT, GPTConfig
from pipeline.params import TrainParams
from pipeline.train import make_optimizer, model_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=86)
    ap.add_argument("--mlp", default="gelu", choices=["gelu", "relu2", "swiglu"])
    ap.add_argument("--pos-encoding", default="rope", choices=["rope", "learned"])
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compile time reported apart)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    a = ap.parse_args()

    set_threads(a.threads)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
                    n_embd=a.n_embd, mlp=a.mlp, pos_encoding=a.pos_encoding, qk_norm=a.qk_norm)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, TrainParams(), device)
    step_model = torch.compile(model) if a.compile else model
    x = torch.randint(0, a.vocab_size, (a.batch_size, a.block_size), device=device)  # (B, T)
    y = torch.randint(0, a.vocab_size, (a.batch_size, a.block_size), device=device)  # (B, T)

    def step() -> None:
        with autocast(device, dtype):
            loss = model_loss(step_model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    # CPU seconds of this process: on a shared machine, tokens per CPU second with one
    # thread is what a quiet machine would give per core; wall time is not.
    cpu = time.process_time() - c0
    print(json.dumps({
        "n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd, "block_size": a.block_size,
        "batch_size": a.batch_size, "mlp": a.mlp, "qk_norm": a.qk_norm, "compile": a.compile,
        "params": model.num_params(), "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "warmup_s": round(warmup_s, 2),
        "tokens_per_s": round(a.steps * a.batch_size * a.block_size / elapsed),
        "tokens_per_cpu_s": round(a.steps * a.batch_size * a.block_size / cpu),
        "loadavg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()

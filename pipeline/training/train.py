"""The training loop: warmup then decay, clipping, accumulation, weight EMA, resume, DDP, dvclive,
and an early stop on request (``training/stop.py``).

Run once per process; under ``torchrun`` every rank runs the same loop on its own
batches and DDP averages the gradients, so all ranks hold identical weights. Rank 0
alone evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from chargen.errors import ChargenError
from chargen.tokenizers import Tokenizer
from pipeline import model as model_module
from pipeline.files import make_dir, write_text
from pipeline.model import GPT, GPTConfig, cross_entropy
from pipeline.params import FinetuneParams, ModelParams, TrainParams
from pipeline.tokens.splits import read_meta, read_tokenizer, split_chars_per_token
from pipeline.training import optim as optim_module
from pipeline.training.batches import WindowSampler
from pipeline.training.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    build_model,
    load_checkpoint,
    run_hash,
    save_checkpoint,
)
from pipeline.training.device import autocast, pick_device, pick_dtype, set_threads
from pipeline.training.finetune import (
    Base,
    check_architecture,
    check_tokenizer,
    finetune_train_params,
    initial_model,
    load_base,
)
from pipeline.training.lora import has_adapters, merge_adapters
from pipeline.training.optim import decay_start, lr_factor, make_optimizer
from pipeline.training.stop import StopRequest

VAL_SEED = 0  # the validation windows never depend on train.seed, so curves compare across runs


# --------------------------------------------------------------------------- data


@dataclass
class EncodedData:
    """The encoded splits the trainer reads (through memmap samplers), their tokenizer and meta."""

    train: WindowSampler
    val: WindowSampler
    tokenizer: Tokenizer
    meta: dict[str, Any]
    train_chars_per_token: float  # converts training throughput and loss to characters

    @classmethod
    def load(cls, encoded_dir: str | Path, block_size: int) -> EncodedData:
        meta, tokenizer = read_meta(encoded_dir), read_tokenizer(encoded_dir)
        train = WindowSampler.for_split(encoded_dir, "train", block_size, seed=0)
        val = WindowSampler.for_split(encoded_dir, "val", block_size, seed=0)
        return cls(train, val, tokenizer, meta, split_chars_per_token(encoded_dir, meta, "train"))


def batch(sampler: WindowSampler, batch_size: int, seed: int, rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch (x, y), each (B, T) int64, a pure function of (seed, rank, step, micro).

    Deriving every batch from its step means a resumed run draws exactly the batches
    the uninterrupted run would have, with no sampler state to save.
    """
    key = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])
    x, y = sampler.fixed_windows(batch_size, key)  # (B, T) each
    return torch.from_numpy(x), torch.from_numpy(y)


# --------------------------------------------------------------------------- optimisation


@torch.no_grad()
def validation_loss(model: GPT, windows: tuple[np.ndarray, np.ndarray], batch_size: int,
                    device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over the fixed validation windows (x, y), each (N, T)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows[0]), batch_size):
        x = torch.from_numpy(windows[0][i : i + batch_size])  # (B, T)
        y = torch.from_numpy(windows[1][i : i + batch_size])  # (B, T)
        with autocast(device, dtype):
            loss = model.loss(x.to(device), y.to(device))
        total += loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain run is a world of one."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def mean_across_ranks(x: float, info: DistInfo, device: torch.device) -> float:
    if info.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world


# --------------------------------------------------------------------------- metrics


class Curves:
    """dvclive logging on rank 0; dvc.yaml stays hand-written (dvcyaml=None)."""

    def __init__(self, live_dir: str | Path, resume_step: int | None) -> None:
        from dvclive import Live

        self.dir = Path(live_dir)
        if resume_step is not None:
            trim_curves(self.dir, resume_step)
        try:
            self.live = Live(dir=str(self.dir), resume=resume_step is not None, save_dvc_exp=False,
                             dvcyaml=None, report=None)
        except Exception as e:
            # dvclive 3.49 fails in a git repository without commits (scmrepo's SCMError).
            if type(e).__name__ != "SCMError":
                raise
            raise ChargenError(
                f"dvclive cannot log in this git repository ({e}); make a first commit and re-run"
            ) from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


def trim_curves(live_dir: Path, step: int) -> None:
    """Drop rows logged after ``step``: a killed run logged past its last checkpoint."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            continue
        col = rows[0].index("step") if "step" in rows[0] else None
        if col is None:
            continue
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[col]) <= step]
        out = io.StringIO()
        csv.writer(out, delimiter="\t", lineterminator="\n").writerows(kept)
        write_text(tsv, out.getvalue())


# --------------------------------------------------------------------------- the loop


# Code whose change invalidates a checkpoint for resuming: the model, the optimizers, this loop.
_SOURCES = (Path(model_module.__file__), Path(optim_module.__file__), Path(__file__))
# Train params that do not change the result, so a resumed run may differ in them.
_NOT_IDENTITY = ("out_dir", "live_dir", "threads", "device", "log_interval")


def run_identity(m: ModelParams, t: TrainParams, meta: dict[str, Any], finetune: dict[str, Any] | None = None) -> str:
    """Hash of everything that defines a run; a checkpoint resumes only a run with the same hash.

    ``finetune``: the finetune params and the base checkpoint's hash, for a fine-tuning run.
    """
    train = {k: v for k, v in dataclasses.asdict(t).items() if k not in _NOT_IDENTITY}
    code = [run_hash(path.read_text(encoding="utf-8")) for path in _SOURCES]
    if finetune is None:
        return run_hash(dataclasses.asdict(m), train, meta, code)
    return run_hash(dataclasses.asdict(m), train, meta, code, finetune)


@dataclass(frozen=True)
class Finetune:
    """A fine-tuning run: its params and the base checkpoint it starts from."""

    params: FinetuneParams
    base: Base

    def identity(self) -> dict[str, Any]:
        return {"params": dataclasses.asdict(self.params), "base_sha256": self.base.sha256}


def train(m: ModelParams, t: TrainParams, encoded_dir: str | Path, f: FinetuneParams | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the model ``m`` with the settings ``t`` on ``encoded_dir``.

    With ``f.init_from`` set, fine-tune that checkpoint instead (``f`` replaces some of ``t``).
    Returns a summary of the run (steps, losses, tokens/s) with the trained ``model``.
    """
    ft = None
    if f is not None and f.init_from:
        ft = Finetune(f, load_base(f.init_from))
        check_architecture(ft.base, m)
        t = finetune_train_params(t, f)
    info = DistInfo.from_env()
    device = pick_device(t.device, info.local_rank)
    dtype = pick_dtype(t.dtype, device)
    set_threads(t.threads)
    make_dir(t.out_dir)  # now, not at the first checkpoint: a run must not fail after its work
    make_dir(t.live_dir)
    data = EncodedData.load(encoded_dir, m.block_size)
    if ft is not None:
        check_tokenizer(ft.base, data.tokenizer, encoded_dir)
    cfg = GPTConfig.from_params(m, data.tokenizer.size)
    if info.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(m, t, cfg, data, info, device, dtype, progress and info.main, ft)
    finally:
        if info.world > 1:
            dist.destroy_process_group()


def _train(m: ModelParams, t: TrainParams, cfg: GPTConfig, data: EncodedData, info: DistInfo,
           device: torch.device, dtype: torch.dtype, progress: bool, ft: Finetune | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    identity = run_identity(m, t, data.meta, None if ft is None else ft.identity())
    out_dir, live_dir = Path(t.out_dir), Path(t.live_dir)
    last_path, best_path = out_dir / LAST, out_dir / BEST

    def fresh_model() -> GPT:
        torch.manual_seed(t.seed)  # same seed on every rank: identical initial weights
        return (GPT(cfg) if ft is None else initial_model(ft.base, cfg, ft.params)).to(device)

    model = fresh_model()
    optimizer = make_optimizer(model, t, device)
    ema: list[torch.Tensor] | None = None  # averaged weights, from the start of the decay phase
    step, best_val, seconds, resumed = 0, math.inf, 0.0, False
    patience = 0 if ft is None else ft.params.patience
    since_best = 0  # validations since the best one, for early stopping

    state = _resumable_state(last_path, identity, info)
    if state is not None:
        if ft is None:
            model = build_model(state, last_path).to(device)
        else:
            model = fresh_model()
            _load_weights(model, state.get("adapters", state["model"]), last_path)
        optimizer = make_optimizer(model, t, device)
        try:
            optimizer.load_state_dict(state["optimizer"])
            ema = None if state["ema"] is None else [e.to(device) for e in state["ema"]]
            torch.set_rng_state(state["rng"]["torch"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{last_path}: cannot restore the training state ({e}); delete it to start fresh") from None
        step, best_val, seconds, resumed = state["step"], state["best_val_loss"], state["train_seconds"], True
        since_best = int(state.get("since_best", 0))
        if info.main:
            print(f"resuming from {last_path} at step {step}/{t.max_steps}", flush=True)
    # A fresh run leaves the previous run's checkpoints in place until it writes its own:
    # best.pt at its first evaluation, last.pt at its first checkpoint.

    val_windows = data.val.fixed_windows(t.eval_windows, VAL_SEED)
    # Every validation target is scored: bits per character = loss x tokens / characters / ln 2.
    val_chars_per_token = float(data.tokenizer.chars_per_token()[val_windows[1]].mean())

    def val_bpc(loss: float) -> float:
        return loss / val_chars_per_token / math.log(2)

    train_model = DistributedDataParallel(model) if info.world > 1 else model
    if t.compile:
        train_model = torch.compile(train_model)  # checkpoints keep saving the plain `model`
    curves = Curves(live_dir, step if resumed else None) if info.main else None
    tokens_per_step = t.batch_size * cfg.block_size * t.grad_accum * info.world

    def checkpoint(path: Path, val_loss: float, train_loss: float, full: bool) -> None:
        extra: dict[str, Any] = {}
        if full:
            extra = {"optimizer": optimizer.state_dict(), "ema": ema, "rng": {"torch": torch.get_rng_state()}}
        plain = model
        if ft is not None:
            extra["origin"] = ft.base.origin(ft.params, data.tokenizer)
            extra["params"] = {"model": dataclasses.asdict(m), "train": dataclasses.asdict(t),
                               "finetune": dataclasses.asdict(ft.params)}
            if full:
                extra["since_best"] = since_best
            if has_adapters(model):  # "model" is always a plain GPT; resuming needs the adapters apart
                plain = merge_adapters(model)
                if full:
                    extra["adapters"] = model.state_dict()
        save_checkpoint(path, {
            "model": plain.state_dict(), "model_config": cfg.to_dict(), "tokenizer": data.tokenizer.describe(),
            "step": step, "val_loss": val_loss, "best_val_loss": best_val, "train_loss": train_loss,
            "val_bpc": val_bpc(val_loss), "best_val_bpc": val_bpc(best_val),
            "train_seconds": seconds, "tokens_seen": step * tokens_per_step, "num_params": plain.num_params(),
            "dtype": str(dtype).removeprefix("torch."), "run_hash": identity,
            "params": {"model": dataclasses.asdict(m), "train": dataclasses.asdict(t)},
            **extra,
        })

    stop = StopRequest()  # before the first curve row: a reader of the curves may then ask to stop
    val_loss, train_loss = math.nan, math.nan
    if info.main and not resumed:
        val_loss = validation_loss(model, val_windows, t.batch_size, device, dtype)
        curves.log(0, {"val/loss": val_loss, "val/bpc": val_bpc(val_loss)})
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
    tok_s = 0.0
    stopped_early = False
    model.train()
    try:
        while step < t.max_steps and not stopped_early and not (patience and since_best >= patience):
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(t.grad_accum):
                x, y = batch(data.train, t.batch_size, t.seed, info.rank, step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Gradients are averaged across ranks only on the last micro-batch.
                sync = micro == t.grad_accum - 1 or info.world == 1
                ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                with ctx:
                    with autocast(device, dtype):
                        loss = model_loss(train_model, x, y)  # mean nats per token
                    (loss / t.grad_accum).backward()
                step_loss += loss.item() / t.grad_accum
            step_loss = mean_across_ranks(step_loss, info, device)
            if not math.isfinite(step_loss):
                raise ChargenError(
                    f"training loss became non-finite ({step_loss}) at step {step + 1} "
                    f"(lr {t.lr * lr_factor(step, t):.3g}); lower train.lr or raise train.warmup_steps"
                )
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            factor = lr_factor(step, t)
            optimizer.set_lr_factor(factor)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if t.ema > 0 and step > decay_start(t):
                ema = update_ema(ema, model, t.ema)
                if step == t.max_steps:  # the run ends with the averaged weights
                    load_ema(model, ema)
            seconds += time.perf_counter() - t0
            window_loss += step_loss
            window_steps += 1
            train_loss = step_loss
            # A stop request ends the run here, as if this were the last step (one rank decides).
            stopped_early = step < t.max_steps and stop_everywhere(stop.requested, info, device)
            last = step == t.max_steps or stopped_early

            if step % t.log_interval == 0 or last:
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / max(now - window_t0, 1e-9)
                if info.main:
                    # Per character through the train split's mean characters per token:
                    # batches are uniform windows of it.
                    cpt = data.train_chars_per_token
                    curves.log(step, {"train/loss": window_loss / window_steps,
                                      "train/bpc": window_loss / window_steps / cpt / math.log(2),
                                      "lr": t.lr * factor, "tokens_per_s": tok_s, "chars_per_s": tok_s * cpt,
                                      "train_seconds": seconds})
                window_loss, window_steps, window_t0 = 0.0, 0, now
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)

            if info.main and (step % t.eval_interval == 0 or last):
                val_loss = validation_loss(model, val_windows, t.batch_size, device, dtype)
                curves.log(step, {"val/loss": val_loss, "val/bpc": val_bpc(val_loss)})
                bar.write(f"step {step}: train loss {step_loss:.4f}, val loss {val_loss:.4f}")
                since_best += 1
                if val_loss < best_val:
                    best_val, since_best = val_loss, 0
                    checkpoint(best_path, val_loss, step_loss, full=False)
                if patience and since_best >= patience:
                    bar.write(f"step {step}: no better val loss in {patience} validations, stopping early")
                    checkpoint(last_path, val_loss, step_loss, full=True)
            if info.main and (step % t.checkpoint_interval == 0 or last):
                checkpoint(last_path, val_loss, step_loss, full=True)
    finally:
        stop.close()
        bar.close()
        if curves is not None:
            curves.close()
    if info.main and not best_path.exists():  # resumed a finished run whose best.pt was removed
        checkpoint(best_path, val_loss, train_loss, full=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if has_adapters(model):
        model = merge_adapters(model)
    return {"step": step, "best_val_loss": best_val, "val_loss": val_loss, "train_loss": train_loss,
            "train_seconds": seconds, "tokens_per_s": tok_s, "chars_per_s": tok_s * data.train_chars_per_token,
            "num_params": model.num_params(), "trainable_params": trainable,
            "dtype": str(dtype).removeprefix("torch."), "resumed": resumed, "stopped_early": stopped_early,
            "rank": info.rank, "model": model}


def stop_everywhere(requested: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's stop request, shared with every rank so that all leave the loop together."""
    if info.world == 1:
        return requested
    flag = torch.tensor([float(requested and info.main)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _load_weights(model: GPT, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: cannot restore the fine-tuned weights ({first}); delete it to start fresh") from None


@torch.no_grad()
def update_ema(ema: list[torch.Tensor] | None, model: GPT, beta: float) -> list[torch.Tensor]:
    """ema <- beta * ema + (1 - beta) * weights; the first call starts it at the weights."""
    params = [p.detach() for p in model.parameters()]
    if ema is None:
        return [p.clone() for p in params]
    torch._foreach_lerp_(ema, params, 1.0 - beta)
    return ema


@torch.no_grad()
def load_ema(model: GPT, ema: list[torch.Tensor]) -> None:
    for p, e in zip(model.parameters(), ema, strict=True):
        p.copy_(e)


def model_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss through ``forward`` so that DDP's gradient hooks see the call."""
    logits, _ = model(x)  # (B, T, V)
    return cross_entropy(logits, y)


def _resumable_state(path: Path, identity: str, info: DistInfo) -> dict[str, Any] | None:
    """The state in ``last.pt`` when it belongs to this very run, else None (start fresh)."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    for key in ("optimizer", "ema", "rng", "best_val_loss", "train_seconds"):
        if key not in state:
            raise CheckpointError(f"{path}: not a resumable checkpoint (no '{key}'); delete it to start fresh")
    if state.get("run_hash") != identity:
        if info.main:
            print(f"params or code changed since {path} was written: starting a fresh run", flush=True)
        return None
    return state

"""Where and in which precision training runs: device, autocast dtype, CPU threads."""

from __future__ import annotations

import contextlib
import os

import torch

from chargen.errors import ChargenError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU. Under torchrun each rank takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ChargenError("train.device is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 autocast where the hardware runs it natively, else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(n: int) -> None:
    """Use ``n`` intra-op CPU threads; 0 leaves torch's default (one per core). More
    threads than cores only contend (and tens of thousands crash torch's thread pool)."""
    cores = os.cpu_count() or 1
    if n > cores:
        raise ChargenError(f"train.threads: {n} threads, but this machine has {cores} cores; "
                           f"use 0 (one per core) or at most {cores}")
    if n > 0:
        torch.set_num_threads(n)

"""Shared fixtures: a tiny trained GPT, exported to fp32 ONNX and quantized to int8.

Built once per test session in a few seconds: a 2-layer, width-32 model trained
for a few dozen steps on a short built-in text, so that it produces recognisable
(non-random) text, then run through the real export and quantize code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from pipeline.vocab import EOT_TOKEN, UNK_TOKEN, Vocab

if TYPE_CHECKING:
    from pipeline.model import GPT

# torch, the exporter and the quantizer are imported inside the fixtures: collecting
# the inference-path tests must not load torch (a test checks that path stays torch-free).

# Short and repetitive on purpose: a tiny model learns its words in seconds.
TINY_TEXT = (
    "the cat sat on the mat. the dog sat on the log.\n"
    "a cat and a dog sat in the sun. the sun is hot.\n"
    "the dog ran to the cat. the cat ran to the mat.\n"
    "is the cat on the mat? yes, the cat is on the mat!\n"
) * 8

TINY_CONFIG = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_METRICS = {"val_loss": 0.0, "test_loss": 0.0, "step": 0}


@dataclass(frozen=True)
class TinyModels:
    fp32: Path  # models/model.fp32.onnx equivalent
    int8: Path  # models/model.int8.onnx equivalent
    vocab: dict  # the vocab dict stored in the models' metadata
    text: str  # the training text
    model: GPT  # the trained torch model (eval mode)


def tiny_vocab(text: str = TINY_TEXT) -> Vocab:
    chars = sorted(set(text))
    counts = [0, 0] + [text.count(c) for c in chars]
    return Vocab([EOT_TOKEN, UNK_TOKEN, *chars], counts)


def train_tiny(vocab: Vocab, text: str = TINY_TEXT, steps: int = 60, seed: int = 0) -> GPT:
    """A tiny GPT trained with plain torch; a couple of seconds on one core."""
    import torch

    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine more threads only contend (10x slower).
    torch.set_num_threads(1)
    try:
        return _train(vocab, text, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(vocab: Vocab, text: str, steps: int, seed: int) -> GPT:
    import torch

    from pipeline.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab.size, **TINY_CONFIG)
    model = GPT(cfg)
    data = torch.from_numpy(vocab.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    T = cfg.block_size
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (16,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + T] for s in starts])
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """fp32 and int8 ONNX files of a tiny trained model, shared by the whole session."""
    from pipeline.export import export_onnx
    from pipeline.quantize import quantize_int8

    out = tmp_path_factory.mktemp("tiny_models")
    vocab = tiny_vocab()
    model = train_tiny(vocab)
    fp32, int8 = out / "model.fp32.onnx", out / "model.int8.onnx"
    export_onnx(model, vocab.to_dict(), fp32, TINY_METRICS)
    quantize_int8(fp32, int8)
    return TinyModels(fp32=fp32, int8=int8, vocab=vocab.to_dict(), text=TINY_TEXT, model=model)


def write_encoded(out_dir: Path, vocab: Vocab, text: str = TINY_TEXT) -> None:
    """data/encoded as the encode stage writes it: vocab.json, meta.json, {train,val,test}.bin."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = vocab.encode(text).astype(vocab.dtype)
    n = len(ids)
    splits = {"train": ids[: n * 8 // 10], "val": ids[n * 8 // 10 : n * 9 // 10], "test": ids[n * 9 // 10 :]}
    for name, part in splits.items():
        np.append(part, np.array([vocab.eot_id], dtype=vocab.dtype)).tofile(out_dir / f"{name}.bin")
    (out_dir / "vocab.json").write_text(json.dumps(vocab.to_dict()), encoding="utf-8")
    meta = {
        "dtype": vocab.dtype.name,
        "vocab_size": vocab.size,
        "splits": {k: len(v) + 1 for k, v in splits.items()},
        "documents": 1,
        "corpus_sha256": "0" * 64,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


STAGES = Path(__file__).resolve().parent.parent / "stages"
ROOT_PARAMS = STAGES.parent / "params.yaml"


def run_stage_script(name: str, project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``stages/<name>.py`` as DVC would, from ``project`` as the working directory."""
    return subprocess.run(
        [sys.executable, str(STAGES / f"{name}.py"), *args],
        cwd=project, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """A project directory holding what the export stage reads: data/encoded, the best
    checkpoint of the tiny model, metrics/eval.json and a params.yaml with small
    measurement settings.  Tests copy it before running stages that write into it."""
    import yaml

    from pipeline.checkpoint import save_checkpoint

    project = tmp_path_factory.mktemp("tiny_project")
    vocab = Vocab.from_dict(tiny_models.vocab)
    write_encoded(project / "data" / "encoded", vocab)
    model = tiny_models.model
    save_checkpoint(project / "checkpoints" / "best.pt", {
        "model": model.state_dict(), "model_config": model.cfg.to_dict(),
        "vocab": tiny_models.vocab, "step": 60, "best_val_loss": 1.0,
    })
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(json.dumps({"test_loss": 1.0, "spelling_rate": 0.5}))
    params = yaml.safe_load(ROOT_PARAMS.read_text(encoding="utf-8"))
    params["sample"].update(num_samples=2, chars=80)
    params["compare"].update(long_context=40, timed_chars=40, repeats=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return project

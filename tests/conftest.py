"""Shared fixtures: a tiny trained GPT, exported to fp32 ONNX and quantized to int8 and int4.

Built once per test session in a few seconds: a 2-layer, width-32 model trained
for a few dozen steps on a short built-in text, so that it produces recognisable
(non-random) text, then run through the real export and quantize code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, settings

from chargen.tokenizers import EOT_TOKEN, UNK_TOKEN, CharTokenizer, Tokenizer

if TYPE_CHECKING:
    from chargen.draft import NGramDraft
    from pipeline.model import GPT, GPTConfig
    from pipeline.params import QuantizeParams

# `pytest --hypothesis-profile soak`: many more examples per property, and the checks that
# visit every code point (test_bpe.py). Off by default, to keep the suite fast.
SOAK_EXAMPLES = 20_000
settings.register_profile("soak", max_examples=SOAK_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])

# torch, the exporter and the quantizer are imported inside the fixtures: collecting
# the inference-path tests must not load torch (a test checks that path stays torch-free).

# Short and repetitive on purpose: a tiny model learns its words in seconds.
TINY_TEXT = (
    "the cat sat on the mat. the dog sat on the log.\n"
    "a cat and a dog sat in the sun. the sun is hot.\n"
    "the dog ran to the cat. the cat ran to the mat.\n"
    "is the cat on the mat? yes, the cat is on the mat!\n"
) * 8

TINY_CONFIG = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "trigram_buckets": 61}
TINY_METRICS = {"val_loss": 0.0, "test_loss": 0.0, "step": 0}

REPO = Path(__file__).resolve().parent.parent
ROOT_PARAMS = REPO / "params.yaml"


def project_params() -> dict[str, Any]:
    """The project's params.yaml as a dict, to edit for a test."""
    return yaml.safe_load(ROOT_PARAMS.read_text(encoding="utf-8"))


def quantize_params(**overrides: Any) -> QuantizeParams:
    """The project's quantize params, with ``overrides``."""
    from pipeline.params import QuantizeParams

    return QuantizeParams(**{**project_params()["quantize"], **overrides})


def tiny_config(vocab_size: int, **overrides: Any) -> GPTConfig:
    """The project's model params at a tiny size (TINY_CONFIG), with ``overrides``."""
    from pipeline.model import GPTConfig

    return GPTConfig(**{**project_params()["model"], **TINY_CONFIG, **overrides}, vocab_size=vocab_size)


@dataclass(frozen=True)
class TinyModels:
    fp32: Path  # models/model.fp32.onnx equivalent
    int8: Path  # models/model.int8.onnx equivalent
    int4: Path  # models/model.int4.onnx equivalent
    tokenizer: CharTokenizer  # the tokenizer stored in the models' metadata
    text: str  # the training text
    model: GPT  # the trained torch model (eval mode)


def tiny_tokenizer(text: str = TINY_TEXT) -> CharTokenizer:
    return CharTokenizer([EOT_TOKEN, UNK_TOKEN, *sorted(set(text))])


def train_tiny(vocab: CharTokenizer, text: str = TINY_TEXT, steps: int = 60, seed: int = 0, **cfg: Any) -> GPT:
    """A tiny GPT trained with plain torch; a couple of seconds on one core."""
    import torch

    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine more threads only contend (10x slower).
    torch.set_num_threads(1)
    try:
        return _train(vocab, text, steps, seed, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(vocab: CharTokenizer, text: str, steps: int, seed: int, cfg: dict[str, Any]) -> GPT:
    import torch

    from pipeline.model import GPT

    torch.manual_seed(seed)
    cfg = tiny_config(vocab.size, **cfg)
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


def tiny_draft(tokenizer: Tokenizer) -> NGramDraft:
    """The draft table of the tiny models: every 3-token context of the tiny text."""
    from pipeline.export.draft import build_draft

    return build_draft(tokenizer.encode(TINY_TEXT), tokenizer.size, context=3, bits=10)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """fp32, int8 and int4 ONNX files of a tiny trained model, shared by the whole session."""
    from pipeline.export.model_file import export_onnx
    from pipeline.export.quantize import quantize_int4, quantize_int8

    out = tmp_path_factory.mktemp("tiny_models")
    tokenizer = tiny_tokenizer()
    model = train_tiny(tokenizer)
    fp32, int8, int4 = (out / f"model.{p}.onnx" for p in ("fp32", "int8", "int4"))
    export_onnx(model, tokenizer, fp32, TINY_METRICS, draft=tiny_draft(tokenizer))
    quantize_int8(fp32, int8, quantize_params())
    quantize_int4(fp32, int4, quantize_params())
    return TinyModels(fp32=fp32, int8=int8, int4=int4, tokenizer=tokenizer, text=TINY_TEXT, model=model)


def write_encoded(out_dir: Path, tokenizer: Tokenizer, text: str = TINY_TEXT) -> None:
    """data/encoded as the encode stage writes it: tokenizer.json, meta.json, {train,val,test}.bin."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(text).astype(tokenizer.dtype)
    n = len(ids)
    splits = {"train": ids[: n * 8 // 10], "val": ids[n * 8 // 10 : n * 9 // 10], "test": ids[n * 9 // 10 :]}
    splits = {k: np.append(v, np.array([tokenizer.eot_id], dtype=tokenizer.dtype)) for k, v in splits.items()}
    for name, part in splits.items():
        part.tofile(out_dir / f"{name}.bin")
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer.describe()), encoding="utf-8")
    meta = {
        "dtype": tokenizer.dtype.name,
        "vocab_size": tokenizer.size,
        "splits": {k: len(v) for k, v in splits.items()},
        "chars": {k: int(tokenizer.chars_per_token()[v].sum()) for k, v in splits.items()},
        "documents": 1,
        "corpus_sha256": "0" * 64,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def write_corpus(raw: Path, docs: list[tuple[str, bytes | str]]) -> None:
    """data/raw as the download stage writes it: documents plus manifest.json."""
    raw.mkdir(parents=True, exist_ok=True)
    entries = []
    for file, content in docs:
        data = content.encode("utf-8") if isinstance(content, str) else content
        (raw / file).parent.mkdir(parents=True, exist_ok=True)
        (raw / file).write_bytes(data)
        entries.append({"name": file.removesuffix(".txt"), "file": file, "source": "test",
                        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "chars": len(data.decode("utf-8", "replace"))})
    (raw / "manifest.json").write_text(json.dumps({"documents": entries}), encoding="utf-8")


def stage_env() -> dict[str, str]:
    """The environment a stage runs in: the checkout's pipeline/ and stages/ importable."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_stage_script(name: str, project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run stage ``name`` as DVC would (``python -m stages.<name>``), from ``project``."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """A project directory holding what the export stage reads: data/encoded, the best
    checkpoint of the tiny model, metrics/eval.json and a params.yaml with small
    measurement settings.  Tests copy it before running stages that write into it."""
    from pipeline.training.checkpoint import save_checkpoint

    project = tmp_path_factory.mktemp("tiny_project")
    write_encoded(project / "data" / "encoded", tiny_models.tokenizer)
    model = tiny_models.model
    save_checkpoint(project / "checkpoints" / "best.pt", {
        "model": model.state_dict(), "model_config": model.cfg.to_dict(),
        "tokenizer": tiny_models.tokenizer.describe(), "step": 60, "best_val_loss": 1.0,
    })
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(json.dumps({"test_loss": 1.0, "spelling_rate": 0.5}))
    params = project_params()
    params["sample"].update(num_samples=2, chars=80)
    params["compare"].update(long_context=40, timed_chars=40, repeats=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return project


# Multi-byte characters on purpose: byte and BPE tokens then end inside a character.
KIND_TEXT = TINY_TEXT + "le café coûte 3 € — très cher ! 日本の猫は€を持つ。\n" * 12
KIND_TRAIN = {"max_steps": 60, "batch_size": 16, "lr": 1.0e-2, "min_lr": 1.0e-3, "warmup_steps": 5,
              "eval_interval": 30, "eval_windows": 8, "checkpoint_interval": 60, "log_interval": 10,
              "threads": 1, "dtype": "float32"}


@dataclass(frozen=True)
class KindModels:
    kind: str
    project: Path  # a project after encode .. quantize: data/, checkpoints/, metrics/, models/, params.yaml
    fp32: Path
    int8: Path
    tokenizer: Tokenizer
    parity_error: float  # the export's largest |ONNX Runtime - PyTorch| logit difference


@pytest.fixture(scope="session", params=["byte", "bpe"])
def kind_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> KindModels:
    """A tiny model of each tokenizer kind besides char, made by the pipeline's own code in
    this process: the encode stage's tokenizer and splits, the training loop, evaluation,
    the export with its parity check, and int8 quantization."""
    from pipeline.evaluation.evaluate import evaluate, write_outputs
    from pipeline.export.model_file import export_checkpoint
    from pipeline.export.quantize import quantize_int8
    from pipeline.params import load_params
    from pipeline.tokens.encode import encode_corpus
    from pipeline.tokens.splits import read_tokenizer
    from pipeline.training.checkpoint import BEST
    from pipeline.training.train import train

    kind = request.param
    root = tmp_path_factory.mktemp(f"kind_{kind}")
    write_corpus(root / "data" / "raw", [("a.txt", KIND_TEXT), ("b.txt", KIND_TEXT[::-1])])
    raw = project_params()
    raw["download"]["out_dir"] = str(root / "data" / "raw")
    raw["encode"].update(out_dir=str(root / "data" / "encoded"), tokenizer=kind, vocab_size=300)
    # BPE without the exact bigram table, as bpe runs use it: it has (V + 1) x V rows.
    raw["model"].update(TINY_CONFIG, bigram=kind != "bpe")
    raw["train"].update(KIND_TRAIN, out_dir=str(root / "checkpoints"), live_dir=str(root / "dvclive"))
    raw["sample"].update(num_samples=2, chars=80)
    raw["evaluate"].update(out=str(root / "metrics" / "eval.json"), samples=str(root / "reports" / "samples.md"))
    raw["export"]["model_dir"] = str(root / "models")
    raw["compare"].update(out_dir=str(root / "metrics"), long_context=40, timed_chars=40, repeats=1)
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    p = load_params(root / "params.yaml")

    encode_corpus(p.download.out_dir, p.encode)
    train(p.model, p.train, p.encode.out_dir, progress=False)
    checkpoint = Path(p.train.out_dir) / BEST
    write_outputs(evaluate(checkpoint, p.encode.out_dir, p.sample, p.evaluate.batch_size), p.sample,
                  p.evaluate.out, p.evaluate.samples)
    fp32, int8 = Path(p.export.model_dir) / "model.fp32.onnx", Path(p.export.model_dir) / "model.int8.onnx"
    exported = export_checkpoint(checkpoint, p.encode.out_dir, p.evaluate.out, fp32, atol=p.export.parity_atol)
    quantize_int8(fp32, int8, p.quantize)
    return KindModels(kind=kind, project=root, fp32=fp32, int8=int8, tokenizer=read_tokenizer(p.encode.out_dir),
                      parity_error=exported["max_abs_diff"])

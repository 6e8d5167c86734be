"""Typed, validated parameters loaded once from ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml``; each stage asks for its
section with :func:`load_params` and gets frozen dataclasses back.  Validation
happens here, once, so that a misspelt key or a bad value is a one-line error
naming the key instead of a traceback deep inside a stage.

``dvc exp run -S train.lr=1e-5`` writes ``1e-5`` into the YAML file, which
PyYAML (YAML 1.1) reads back as a *string*; numbers given as strings are
therefore coerced to the declared type.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pipeline.errors import ChargenError

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ChargenError, ValueError):
    """A parameter is missing, misspelt or has an invalid value."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Source:
    """One corpus source: exactly one of ``index``, ``url`` or ``path``."""

    name: str
    index: str | None = None  # "NAME==VERSION" on pip's configured index (sdist, else a wheel)
    url: str | None = None  # http(s):// URL
    path: str | None = None  # local file or directory
    sha256: str | None = None  # required for the default corpus, warned about otherwise
    members: str | None = None  # glob of archive members (or files of a directory) to keep

    def __post_init__(self) -> None:
        # The name becomes a directory under data/raw, so it must be one plain path segment.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise ParamsError(
                f"download.sources: name {self.name!r} must be letters, digits, '.', '_' or '-'"
            )
        given = [k for k in ("index", "url", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ParamsError(
                f"download.sources[{self.name}]: give exactly one of index, url or path "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.index and "==" not in self.index:
            raise ParamsError(
                f"download.sources[{self.name}].index: expected 'NAME==VERSION', got {self.index!r}"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ParamsError(
                f"download.sources[{self.name}].url: expected an http(s):// URL, got {self.url!r}"
            )
        if self.sha256 is not None:
            h = self.sha256.lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ParamsError(
                    f"download.sources[{self.name}].sha256: expected 64 hex digits, got {self.sha256!r}"
                )


@dataclass(frozen=True)
class DownloadParams:
    sources: tuple[Source, ...]
    out_dir: str = "data/raw"
    cache_dir: str = ".cache/chargen/downloads"
    max_extract_mb: int = 2048  # archive-bomb cap on the total extracted size
    timeout_s: float = 60.0
    retries: int = 3

    def __post_init__(self) -> None:
        if not self.sources:
            raise ParamsError("download.sources: list at least one corpus source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ParamsError("download.sources: source names must be unique")
        _positive("download.max_extract_mb", self.max_extract_mb)
        _positive("download.timeout_s", self.timeout_s)
        if self.retries < 0:
            raise ParamsError(f"download.retries: must be >= 0, got {self.retries}")


@dataclass(frozen=True)
class EncodeParams:
    out_dir: str = "data/encoded"
    min_char_count: int = 1  # characters seen fewer times map to the unknown token
    normalize_nfc: bool = True
    train_frac: float = 0.90
    val_frac: float = 0.05
    test_frac: float = 0.05
    chunk_chars: int = 1_000_000  # bytes read per streaming chunk (memory and cache size)

    def __post_init__(self) -> None:
        total = self.train_frac + self.val_frac + self.test_frac
        if abs(total - 1.0) > 1e-6:
            raise ParamsError(
                f"encode: train_frac + val_frac + test_frac must be 1.0 (got {total:g})"
            )
        for k in ("train_frac", "val_frac", "test_frac"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ParamsError(f"encode.{k}: must be in [0, 1], got {v}")
        if self.train_frac <= 0:
            raise ParamsError("encode.train_frac: must be > 0")
        _positive("encode.min_char_count", self.min_char_count)
        _positive("encode.chunk_chars", self.chunk_chars)


@dataclass(frozen=True)
class ModelParams:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = False
    pos_encoding: Literal["rope", "learned"] = "rope"
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    qk_norm: bool = False
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "block_size"):
            _positive(f"model.{k}", getattr(self, k))
        if self.n_embd % self.n_head:
            raise ParamsError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ParamsError("model: rotary positions need an even head size (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"model.dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainParams:
    out_dir: str = "checkpoints"
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    threads: int = 0  # 0: let torch decide
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2  # wsd only: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_windows: int = 200  # fixed validation windows, same for every run
    checkpoint_interval: int = 250
    log_interval: int = 10
    compile: bool = False  # torch.compile the model (pays its compile time once per run)

    def __post_init__(self) -> None:
        for k in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_windows",
                  "checkpoint_interval", "log_interval"):
            _positive(f"train.{k}", getattr(self, k))
        for k in ("lr", "min_lr", "beta1", "beta2"):
            _positive(f"train.{k}", getattr(self, k))
        if self.min_lr > self.lr:
            raise ParamsError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.warmup_steps < 0 or self.threads < 0:
            raise ParamsError("train.warmup_steps and train.threads must be >= 0")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ParamsError(f"train.decay_frac: must be in [0, 1], got {self.decay_frac}")


@dataclass(frozen=True)
class SampleParams:
    """How samples are drawn for the spelling rate and the before/after report."""

    prompt: str = "Once upon a time,"
    num_samples: int = 8
    chars: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    seed: int = 1234

    def __post_init__(self) -> None:
        _positive("sample.num_samples", self.num_samples)
        _positive("sample.chars", self.chars)
        _positive("sample.temperature", self.temperature)


@dataclass(frozen=True)
class EvaluateParams:
    out: str = "metrics/eval.json"
    samples: str = "reports/samples.md"  # before/after training samples, side by side
    checkpoint: str = "checkpoints/best.pt"
    batch_size: int = 64  # scoring windows per forward pass

    def __post_init__(self) -> None:
        _positive("evaluate.batch_size", self.batch_size)


@dataclass(frozen=True)
class ExportParams:
    out: str = "models/model.fp32.onnx"
    opset: int = 23  # 23 brings the fused RotaryEmbedding and Attention (with a KV cache) ops
    parity_atol: float = 1e-4  # max |ONNX Runtime - PyTorch| logit difference

    def __post_init__(self) -> None:
        if not 23 <= self.opset <= 25:
            raise ParamsError(
                f"export.opset: must be between 23 and 25 (the graph uses opset-23 Attention), got {self.opset}"
            )
        _positive("export.parity_atol", self.parity_atol)


QUANTIZABLE_OPS = ("MatMul", "Gather")


@dataclass(frozen=True)
class QuantizeParams:
    out: str = "models/model.int8.onnx"  # quantized from export.out
    op_types: tuple[str, ...] = ("MatMul",)  # Gather would also quantize the embedding
    per_channel: bool = False
    reduce_range: bool = True  # 7-bit weights: no u8s8 saturation on CPUs without VNNI

    def __post_init__(self) -> None:
        if "MatMul" not in self.op_types:
            raise ParamsError("quantize.op_types: must include MatMul (the weights that matter)")
        bad = [op for op in self.op_types if op not in QUANTIZABLE_OPS]
        if bad:
            raise ParamsError(
                f"quantize.op_types: {bad[0]!r} is not supported (use {', '.join(QUANTIZABLE_OPS)})"
            )


@dataclass(frozen=True)
class CompareParams:
    threads: int = 1  # ONNX Runtime intra-op threads for every measurement
    long_context: int = 1000  # characters of context before chars/s is timed
    timed_chars: int = 400  # characters timed for chars/s
    repeats: int = 3  # speed is the best of this many timings (the machine may be busy)

    def __post_init__(self) -> None:
        for k in ("threads", "long_context", "timed_chars", "repeats"):
            _positive(f"compare.{k}", getattr(self, k))


@dataclass(frozen=True)
class Params:
    download: DownloadParams
    encode: EncodeParams = field(default_factory=EncodeParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    compare: CompareParams = field(default_factory=CompareParams)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ParamsError(f"{key}: must be > 0, got {value}")


# --------------------------------------------------------------------------- loading


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` on any problem."""
    import yaml  # only the pipeline needs YAML; the inference path never loads params

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return build(Params, raw, "")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and coercing types."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown parameter '{where}{unknown[0]}' (known in {prefix or 'params'}: "
            f"{', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"missing parameter '{key}'")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{prefix or 'params'}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ParamsError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ParamsError(f"{key}: expected a string, got {value!r}")
    raise ParamsError(f"{key}: unsupported parameter type {tp!r}")  # pragma: no cover

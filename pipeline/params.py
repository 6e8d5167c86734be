"""Typed, validated parameters loaded once from ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml`` and only there: the dataclasses
below name and type each key but hold no default values, so code and file cannot
disagree. Each stage loads the file with :func:`load_params` and hands the sections
it declares in ``dvc.yaml`` to the library. Validation happens here, once, so that a
misspelt key or a bad value is a one-line error naming the key instead of a
traceback deep inside a stage.

Checks are generic: every number must be finite, every integer non-negative and
every string non-empty unless its type says otherwise (``Annotated`` with
:class:`Range` or :data:`MaybeEmpty`); what involves several keys is checked in the
section's ``__post_init__``.

``dvc exp run -S train.lr=1e-5`` writes ``1e-5`` into the YAML file, which PyYAML
(YAML 1.1) reads back as a *string*; numbers given as strings are therefore coerced
to the declared type.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from chargen.contract import MIN_TEMPERATURE, OPSET
from chargen.errors import ChargenError

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ChargenError, ValueError):
    """A parameter is missing, misspelt or has an invalid value."""


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number (``None``: unbounded); ``open_low`` excludes ``low``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def check(self, key: str, value: float) -> None:
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            raise ParamsError(f"{key}: must be {self.describe()}, got {value}")

    def describe(self) -> str:
        low = None if self.low is None else f"{'> ' if self.open_low else '>= '}{self.low:g}"
        high = None if self.high is None else f"<= {self.high:g}"
        if low and high:
            return f"{low} and {high}"
        return low or high or "a number"


class _MaybeEmpty:
    """Marks a string that may be empty."""


MaybeEmpty = _MaybeEmpty()
NON_NEGATIVE = Range(0)
Seed = Annotated[int, Range(0, 2**63 - 1)]  # torch's generators take a signed 64-bit seed

Positive = Annotated[int, Range(1)]
PositiveFloat = Annotated[float, Range(0, open_low=True)]
Fraction = Annotated[float, Range(0, 1)]


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """A params section: its fields are checked on construction (generic checks by type,
    then the section's own :meth:`check` for what involves several fields)."""

    _prefix: ClassVar[str]  # where the section sits in params.yaml, for messages

    def __post_init__(self) -> None:
        prefix = self._prefix
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            _check_value(getattr(self, f.name), hints[f.name], f"{prefix}.{f.name}")
        self.check()

    def check(self) -> None:
        """Checks across fields; a section overrides it."""


MAX_OPERAND_DIGITS = 30  # far beyond what a small model learns; keeps the corpus finite


@dataclass(frozen=True)
class Operation(Section):
    """One kind of training problem: an operation and its operands' digit counts (an operation
    may have several entries, e.g. one for all sizes and one for its longest operands)."""

    _prefix = "download.sources.arithmetic.operations"

    op: Literal["add", "sub", "mul", "div"]  # div: integer (floor) division
    digits: tuple[int, ...]  # [fewest, most] digits of each operand
    weight: PositiveFloat  # relative share of the training problems

    def check(self) -> None:
        if len(self.digits) != 2 or not 1 <= self.digits[0] <= self.digits[1] <= MAX_OPERAND_DIGITS:
            raise ParamsError(
                f"{self._prefix}[{self.op}].digits: expected [fewest, most] with "
                f"1 <= fewest <= most <= {MAX_OPERAND_DIGITS}, got {list(self.digits)}"
            )


@dataclass(frozen=True)
class ArithmeticParams(Section):
    """A generated corpus of equations, one per line (pipeline/corpus/arithmetic.py)."""

    _prefix = "download.sources.arithmetic"

    seed: Seed
    answer: Literal["plain", "reversed"]  # reversed: the answer's least significant digit first
    operations: tuple[Operation, ...]
    train_problems: Positive  # lines of the training document (drawn with repetition)
    val_problems: Positive  # lines of the validation document
    test_problems: Positive  # distinct held-out problems per operation and operand digit counts
    val_frac: Annotated[float, Range(0, 1, open_low=True)]  # share of all problems held out for val
    test_frac: Annotated[float, Range(0, 1, open_low=True)]  # share of all problems held out for test
    longer_test: bool  # also test operands one digit longer than any in training

    def check(self) -> None:
        if not self.operations:
            raise ParamsError(f"{self._prefix}.operations: list at least one operation")
        if self.val_frac + self.test_frac >= 1:
            raise ParamsError(f"{self._prefix}: val_frac + test_frac must be below 1 (training needs the rest)")


@dataclass(frozen=True)
class Source(Section):
    """One corpus source: exactly one of ``index``, ``url``, ``path`` or ``arithmetic``."""

    name: str
    index: str | None = None  # "NAME==VERSION" on pip's configured index (sdist, else a wheel)
    url: str | None = None  # http(s):// URL
    path: str | None = None  # local file or directory
    arithmetic: ArithmeticParams | None = None  # generated equations
    sha256: str | None = None  # required for the default corpus, warned about otherwise
    members: str | None = None  # glob of archive members (or files of a directory) to keep
    _prefix = "download.sources"

    def check(self) -> None:
        # The name becomes a directory under data/raw, so it must be one plain path segment.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise ParamsError(
                f"download.sources: name {self.name!r} must be letters, digits, '.', '_' or '-'"
            )
        given = [k for k in ("index", "url", "path", "arithmetic") if getattr(self, k)]
        if len(given) != 1:
            raise ParamsError(
                f"download.sources[{self.name}]: give exactly one of index, url, path or arithmetic "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.arithmetic and (self.sha256 or self.members):
            raise ParamsError(
                f"download.sources[{self.name}]: a generated source takes no sha256 or members"
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
class DownloadParams(Section):
    _prefix = "download"

    sources: tuple[Source, ...]
    out_dir: str
    cache_dir: str
    max_extract_mb: Positive  # archive-bomb cap on the total extracted size
    timeout_s: PositiveFloat
    retries: int

    def check(self) -> None:
        if not self.sources:
            raise ParamsError("download.sources: list at least one corpus source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ParamsError("download.sources: source names must be unique")


@dataclass(frozen=True)
class EncodeParams(Section):
    _prefix = "encode"

    out_dir: str
    tokenizer: Literal["char", "byte", "bpe"]
    vocab_size: Positive  # bpe only: tokens to learn (the trainer may stop short)
    min_char_count: Positive  # char only: characters seen fewer times map to the unknown token
    normalize_nfc: bool
    train_frac: Annotated[float, Range(0, 1, open_low=True)]
    val_frac: Annotated[float, Range(0, 1, open_low=True)]  # training measures it: not 0
    test_frac: Annotated[float, Range(0, 1, open_low=True)]  # evaluation scores it: not 0
    chunk_chars: Positive  # bytes read per streaming chunk (memory and cache size)

    def check(self) -> None:
        total = self.train_frac + self.val_frac + self.test_frac
        if abs(total - 1.0) > 1e-6:
            raise ParamsError(
                f"encode: train_frac + val_frac + test_frac must be 1.0 (got {total:g})"
            )


@dataclass(frozen=True)
class ModelParams(Section):
    """The transformer's shape; ``pipeline.model.GPTConfig`` adds the vocabulary size."""

    _prefix = "model"

    n_layer: Positive
    n_head: Positive
    n_embd: Positive
    block_size: Positive  # context length in tokens
    dropout: Annotated[float, Range(0, 0.99)]
    bias: bool
    pos_encoding: Literal["rope", "learned"]
    mlp: Literal["gelu", "relu2", "swiglu"]
    qk_norm: bool
    tie_weights: bool
    bigram: bool  # exact (previous, current) token embedding table added to the input
    trigram_buckets: int  # rows of the hashed (two before, previous, current) table; 0: none
    logit_cap: float  # logits = cap * tanh(logits / cap); 0: no cap

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ParamsError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ParamsError("model: rotary positions need an even head size (n_embd / n_head)")


@dataclass(frozen=True)
class TrainParams(Section):
    _prefix = "train"

    out_dir: str  # checkpoints: last.pt (resume) and best.pt (lowest validation loss)
    live_dir: str  # dvclive's curves and training metrics
    seed: Seed
    device: Literal["auto", "cpu", "cuda"]
    dtype: Literal["auto", "float32", "bfloat16"]
    threads: Annotated[int, NON_NEGATIVE]  # 0: let torch decide (one per core)
    batch_size: Positive
    grad_accum: Positive
    max_steps: Positive
    lr: PositiveFloat  # AdamW's peak rate (with muon: for the embeddings, tables and gains)
    min_lr: PositiveFloat  # the schedule's floor, as a share of lr for every rate
    schedule: Literal["cosine", "wsd"]
    warmup_steps: int
    decay_frac: Fraction  # share of steps of wsd's cool-down, and of the weight EMA
    weight_decay: Annotated[float, NON_NEGATIVE]
    beta1: Annotated[float, Range(0, 1)]
    beta2: Annotated[float, Range(0, 1)]
    grad_clip: Annotated[float, NON_NEGATIVE]  # 0: off
    optimizer: Literal["adamw", "muon"]  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: PositiveFloat
    muon_momentum: Annotated[float, Range(0, 1)]
    muon_weight_decay: Annotated[float, NON_NEGATIVE]  # per step: weight *= 1 - lr * decay
    ema: Annotated[float, Range(0, 0.9999)]  # weight average over the decay phase (its beta); 0: none
    eval_interval: Positive
    eval_windows: Positive  # fixed validation windows, same for every run
    checkpoint_interval: Positive
    log_interval: Positive
    compile: bool  # torch.compile the model (pays its compile time once per run)

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ParamsError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")


@dataclass(frozen=True)
class FinetuneParams(Section):
    """Start from a trained chargen checkpoint instead of from scratch (``init_from`` empty:
    from scratch, and the rest of the section is not used)."""

    _prefix = "finetune"

    base_dir: str  # the folder the base checkpoints sit in: the stages that read one depend on it
    init_from: Annotated[str, MaybeEmpty]  # a checkpoint inside base_dir; "": train from scratch
    new_chars: Literal["unk", "extend"]  # characters the base lacks: the unknown token, or new rows
    method: Literal["full", "freeze", "lora"]  # what trains: everything, the upper layers, adapters
    freeze_layers: int  # freeze: the embeddings, n-gram tables and this many lowest blocks stay fixed
    lora_rank: Positive  # lora: rank of the adapters on every block's matrices
    lora_alpha: PositiveFloat  # lora: the adapters' output is scaled by alpha / rank
    # While fine-tuning these replace the train keys of the same name: a small corpus wants
    # a lower rate, a short warm-up, a short run and frequent validation for early stopping.
    lr: PositiveFloat
    min_lr: PositiveFloat
    muon_lr: PositiveFloat
    warmup_steps: int
    max_steps: Positive
    eval_interval: Positive
    patience: int  # stop after this many validations without a better loss; 0: never

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ParamsError(f"finetune.min_lr ({self.min_lr}) must not exceed finetune.lr ({self.lr})")
        if self.init_from and not _inside(self.init_from, self.base_dir):
            raise ParamsError(
                f"finetune.init_from: {self.init_from!r} is not inside finetune.base_dir "
                f"({self.base_dir!r}), which the stages depend on; copy the checkpoint there"
            )


def _inside(path: str, folder: str) -> bool:
    """True when ``path`` lies strictly inside ``folder`` (both relative to the project)."""
    p, f = Path(path), Path(folder)
    return p != f and ".." not in p.parts and (p.is_relative_to(f) or p.resolve().is_relative_to(f.resolve()))


@dataclass(frozen=True)
class SampleParams(Section):
    """How samples are drawn for the spelling rate and the before/after report."""

    _prefix = "sample"

    prompt: Annotated[str, MaybeEmpty]  # "": start a new document
    num_samples: Positive
    chars: Positive
    temperature: Annotated[float, Range(MIN_TEMPERATURE)]
    top_k: Annotated[int, NON_NEGATIVE]  # 0: off
    seed: Seed


@dataclass(frozen=True)
class EvaluateParams(Section):
    _prefix = "evaluate"

    out: str  # metrics file
    samples: str  # before/after training samples, side by side
    batch_size: Positive  # scoring windows per forward pass


@dataclass(frozen=True)
class ExportParams(Section):
    _prefix = "export"

    model_dir: str  # models/model.<precision>.onnx (chargen.contract.model_path)
    opset: Annotated[int, Range(OPSET, 25)]  # the fused RotaryEmbedding, Attention and TensorScatter ops
    parity_atol: PositiveFloat  # max |ONNX Runtime - PyTorch| logit difference
    draft_context: Annotated[int, Range(0, 8)]  # the draft table guesses from this many tokens; 0: no table
    draft_bits: Annotated[int, Range(4, 24)]  # the table has 2**bits entries
    draft_min_count: Positive  # a bucket guesses only a next token seen at least this often


QUANTIZABLE_OPS = ("MatMul", "Gather")


@dataclass(frozen=True)
class QuantizeParams(Section):
    _prefix = "quantize"

    op_types: tuple[str, ...]  # Gather would also quantize the embedding
    per_channel: bool
    reduce_range: bool  # 7-bit weights: no u8s8 saturation on CPUs without VNNI
    int4_block_size: Annotated[int, Range(16, 256)]  # int4: weights per block sharing one scale (ORT: 16-256)

    def check(self) -> None:
        if "MatMul" not in self.op_types:
            raise ParamsError("quantize.op_types: must include MatMul (the weights that matter)")
        if self.int4_block_size & (self.int4_block_size - 1):
            raise ParamsError(
                f"quantize.int4_block_size: must be a power of two from 16 to 256, got {self.int4_block_size}"
            )
        bad = [op for op in self.op_types if op not in QUANTIZABLE_OPS]
        if bad:
            raise ParamsError(
                f"quantize.op_types: {bad[0]!r} is not supported (use {', '.join(QUANTIZABLE_OPS)})"
            )


@dataclass(frozen=True)
class CompareParams(Section):
    _prefix = "compare"

    out_dir: str  # metrics/<precision>.json
    threads: Positive  # ONNX Runtime intra-op threads for every measurement
    long_context: Positive  # tokens of context before the speed is timed
    timed_chars: Positive  # characters timed for chars/s (decoded from the sampled tokens)
    repeats: Positive  # speed is the best of this many timings (the machine may be busy)


@dataclass(frozen=True)
class ReportParams(Section):
    _prefix = "report"

    out: str  # differences between the precisions
    plot: str  # rows of the side-by-side plot
    charts: str  # folder of SVG and PNG charts with a README.md that shows them
    png_scale: Annotated[float, Range(0.25, 8)]  # PNG pixels per SVG pixel (a chart of 8x is 5,000 px wide)


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml."""

    download: DownloadParams
    encode: EncodeParams
    model: ModelParams
    train: TrainParams
    finetune: FinetuneParams
    sample: SampleParams
    evaluate: EvaluateParams
    export: ExportParams
    quantize: QuantizeParams
    compare: CompareParams
    report: ReportParams


# --------------------------------------------------------------------------- loading


def read_yaml_mapping(path: Path, hint: str = "run from the project root", holds: str = "sections") -> dict:
    """The mapping at the top of a YAML file; :class:`ParamsError` naming the problem."""
    import yaml  # only the pipeline needs YAML; the runtime never loads params

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found ({hint})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: unreadable ({e})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of {holds} at the top level")
    return raw


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` on any problem."""
    raw = read_yaml_mapping(Path(path))
    return build(Params, raw, "")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        name = unknown[0] if unknown[0].isidentifier() else _short(unknown[0])
        raise ParamsError(
            f"unknown parameter '{where}{name}' (known in {prefix or 'params'}: "
            f"{', '.join(f for f in fields if not f.startswith('_'))})"
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
    """``value`` as type ``tp`` (constraints are checked when the section is built)."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}: must be one of {', '.join(map(repr, args))}, got {_short(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {_short(value)}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    scalar = _SCALARS.get(tp)
    if scalar is None:  # pragma: no cover - a field of a type this loader does not know
        raise ParamsError(f"{key}: unsupported parameter type {tp!r}")
    return scalar(value, key)


def _check_value(value: Any, tp: Any, key: str) -> None:
    """The generic checks of one field's value: finite numbers in their range (by default
    non-negative), non-empty strings, recursively through tuples."""
    extras: tuple = ()
    if typing.get_origin(tp) is Annotated:
        tp, *rest = typing.get_args(tp)
        extras = tuple(rest)
    if isinstance(value, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        for i, v in enumerate(value):
            _check_value(v, inner, f"{key}[{i}]")
    elif isinstance(value, bool) or value is None or isinstance(value, Section):
        return
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            raise ParamsError(f"{key}: must be a finite number, got {_short(value)}")
        for r in [e for e in extras if isinstance(e, Range)] or [NON_NEGATIVE]:
            r.check(key, value)
    elif isinstance(value, str) and not value.strip() and MaybeEmpty not in extras:
        raise ParamsError(f"{key}: must not be empty")


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ParamsError(f"{key}: expected true or false, got {_short(value)}")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    f = _as_float(value, key, "an integer")
    if not f.is_integer():
        raise ParamsError(f"{key}: expected an integer, got {_short(value)}")
    return int(f)


def _as_float(value: Any, key: str, what: str = "a number") -> float:
    if isinstance(value, bool):
        raise ParamsError(f"{key}: expected {what}, got {_short(value)}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ParamsError(f"{key}: expected {what}, got {_short(value)}") from None
    if not math.isfinite(f):
        raise ParamsError(f"{key}: must be a finite number, got {_short(value)}")
    return f


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ParamsError(f"{key}: expected a string, got {_short(value)}")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}

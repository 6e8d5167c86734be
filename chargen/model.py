"""An exported chargen model: one ONNX Runtime session and what its metadata says.

``ChargenModel.load`` opens a model file, checks it against the contract
(``chargen.contract``) and against its own graph, and rebuilds the tokenizer from
the file alone. ``forward`` is one session call; generation and scoring live in
``chargen.generate`` and ``chargen.scoring``. Shapes: B batch, T new tokens,
H heads, S cache slots, D head size, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from chargen import contract
from chargen.draft import NGramDraft
from chargen.errors import ModelError
from chargen.tokenizers import Tokenizer, TokenizerError, from_description

# The longest context a file may state: far beyond what a CPU decodes at speed, and low
# enough that a corrupt value is refused here rather than as a multi-gigabyte cache.
MAX_BLOCK_SIZE = 1 << 16


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape as its metadata states it (``contract.CONFIG_KEYS``)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    pos_encoding: str
    num_params: int

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_metadata(cls, cfg: Any) -> ModelConfig:
        """Parse and range-check the config object; ValueError names the bad key."""
        if not isinstance(cfg, dict):
            raise ValueError("config is not a JSON object")
        missing = [k for k in contract.CONFIG_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}")
        ints = {}
        for key in contract.CONFIG_KEYS:
            if key == "pos_encoding":
                continue
            value = cfg[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {key} must be a positive integer, got {value!r}")
            ints[key] = value
        if cfg["pos_encoding"] not in contract.POS_ENCODINGS:
            raise ValueError(f"config pos_encoding must be one of {', '.join(contract.POS_ENCODINGS)}")
        if ints["block_size"] > MAX_BLOCK_SIZE:
            raise ValueError(f"config block_size {ints['block_size']} is above {MAX_BLOCK_SIZE}")
        if ints["n_embd"] % ints["n_head"]:
            raise ValueError(f"config n_embd {ints['n_embd']} is not a multiple of n_head {ints['n_head']}")
        return cls(pos_encoding=cfg["pos_encoding"], **ints)


def session_options(threads: int | None) -> ort.SessionOptions:
    """One intra-op thread by default (0: ORT's choice, one per core): a step is a few
    hundred microseconds of small matmuls, where a thread pool costs more than it saves."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if threads is None else threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: the CLI's stderr is for the user
    return so


def open_session(path: Path, threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime session of ``path``; ModelError when the file cannot be run."""
    if not path.is_file():
        what = ("is a directory, not a model file" if path.is_dir() else
                "is not a regular file" if path.exists() else "does not exist")
        raise ModelError(f"model file {path} {what}")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several types for bad files; all mean "unreadable"
        # ORT prefixes "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:".
        text = " ".join(str(e).split()) or type(e).__name__
        opset = re.search(r"Opset (\d+) is under development", text)
        if opset:  # a valid model, newer than this ONNX Runtime
            raise ModelError(
                f"{path} uses ONNX opset {opset.group(1)}, which ONNX Runtime {ort.__version__} "
                "cannot run; upgrade it (pip install -U onnxruntime)"
            ) from None
        reason = text.split("failed:", 1)[-1].strip()[:200]
        raise ModelError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: {reason}); "
            "re-create it with `dvc repro` or give another model file"
        ) from None


def read_metadata(path: Path, session: ort.InferenceSession) -> dict[str, str]:
    """The chargen metadata of a session, checked for format version and completeness."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    version = meta.get(contract.META_FORMAT)
    if version is None:
        raise ModelError(
            f"{path} is an ONNX model but not a chargen model (no chargen.* metadata); "
            "use a model written by the export or quantize stage"
        )
    if version != contract.FORMAT_VERSION:
        raise ModelError(
            f"{path} uses chargen model format {version!r}, this version reads "
            f"{contract.FORMAT_VERSION!r}; re-export it with `dvc repro` (or use the chargen "
            "version that wrote it)"
        )
    missing = [k for k in contract.REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(f"{path}: chargen metadata lacks {', '.join(missing)}; re-export the model")
    return meta


class ChargenModel:
    """An exported chargen model: tokenizer, config, metrics and an ORT session."""

    def __init__(self, path: Path, session: ort.InferenceSession, meta: dict[str, str]) -> None:
        self.path = path
        self.session = session
        self.precision = meta[contract.META_PRECISION]
        try:
            self.tokenizer: Tokenizer = from_description(json.loads(meta[contract.META_TOKENIZER]))
            self.config_dict: dict[str, Any] = _json_object(meta[contract.META_CONFIG], "config")
            self.config = ModelConfig.from_metadata(self.config_dict)
            self.metrics: dict[str, Any] = _json_object(meta.get(contract.META_METRICS, "{}"), "metrics")
            self.origin: dict[str, Any] = _json_object(meta.get(contract.META_ORIGIN, "{}"), "origin")
        except (ValueError, TokenizerError) as e:  # JSONDecodeError is a ValueError
            raise ModelError(f"{path}: chargen metadata is malformed ({e}); re-export the model") from None
        self._draft_text = meta.get(contract.META_DRAFT)
        self._draft: NGramDraft | None = None
        self.prev_ids = self._prev_ids_width()
        self._check_graph()

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> ChargenModel:
        """Open and validate a chargen ONNX file; ModelError says what is wrong with it."""
        path = Path(path)
        session = open_session(path, threads)
        return cls(path, session, read_metadata(path, session))

    def _prev_ids_width(self) -> int:
        """How many ids before the new ones the graph reads (its ``prev_ids`` input), or 0."""
        shape = {i.name: i.shape for i in self.session.get_inputs()}.get(contract.PREV_IDS)
        if shape is None:
            return 0
        if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
            raise ModelError(f"{self.path}: graph input {contract.PREV_IDS} has shape {shape}, "
                             "expected (batch, n); re-export the model")
        return shape[1]

    def _check_graph(self) -> None:
        """The graph's inputs, outputs and fixed dimensions agree with the metadata."""
        cfg = self.config
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        expected_inputs = contract.input_names(cfg.n_layer, self.prev_ids > 0)
        lacking = sorted((set(expected_inputs) - set(inputs))
                         | (set(contract.output_names(cfg.n_layer)) - set(outputs)))
        extra = sorted(set(inputs) - set(expected_inputs))
        if lacking or extra:
            what = f"lacks {', '.join(lacking[:3])}" if lacking else f"has unexpected inputs {', '.join(extra[:3])}"
            raise ModelError(
                f"{self.path}: graph {what} (its inputs/outputs do not match its chargen config of "
                f"{cfg.n_layer} layers); re-export the model"
            )
        past = inputs[contract.past_names(cfg.n_layer)[0]]  # (B, H, S, D)
        expected = {
            "n_head": (past, 1, cfg.n_head),
            "head size": (past, 3, cfg.head_size),
            "vocabulary size": (outputs[contract.LOGITS], 2, cfg.vocab_size),
        }
        for what, (shape, axis, want) in expected.items():
            got = shape[axis] if len(shape) > axis else None
            if isinstance(got, int) and got != want:
                raise ModelError(
                    f"{self.path}: metadata says {what} {want} but the graph has {got}; re-export the model"
                )
        if self.tokenizer.size != cfg.vocab_size:
            raise ModelError(
                f"{self.path}: the tokenizer has {self.tokenizer.size} tokens but the graph scores "
                f"{cfg.vocab_size}; re-export the model"
            )

    # ------------------------------------------------------------------ properties

    @property
    def draft(self) -> NGramDraft | None:
        """The file's draft table (read on first use), or None when it has none."""
        if self._draft is None and self._draft_text is not None:
            try:
                self._draft = NGramDraft.from_description(json.loads(self._draft_text), self.vocab_size)
            except ValueError as e:  # JSONDecodeError and binascii.Error are ValueErrors
                raise ModelError(f"{self.path}: its draft table is malformed ({e}); re-export the model") from None
        return self._draft

    @draft.setter
    def draft(self, table: NGramDraft | None) -> None:
        """Decode with ``table`` in place of the file's own (None: one token per call)."""
        self._draft, self._draft_text = table, None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_params(self) -> int:
        return self.config.num_params

    # ------------------------------------------------------------------ forward

    def new_cache(self, batch: int, slots: int) -> list[np.ndarray]:
        """An empty cache: 2 * n_layer zeroed arrays (B, H, S, D), the keys and values of every layer."""
        cfg = self.config
        return [np.zeros((batch, cfg.n_head, slots, cfg.head_size), dtype=np.float32) for _ in range(2 * cfg.n_layer)]

    def no_prev_ids(self, batch: int) -> np.ndarray:
        """(B, n) ids that stand for "no token before": the start of a text."""
        return np.full((batch, self.prev_ids), self.vocab_size, dtype=np.int64)

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, cache: list[np.ndarray], start: int = 0,
        prev_ids: np.ndarray | None = None, mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """One session call: ids, positions (B, T) int64 -> logits (B, T, V).

        The new tokens' keys and values are written into ``cache`` (2 * n_layer C-contiguous
        float32 arrays (B, H, S, D), see :meth:`new_cache`) in place, new token t at slot
        (start + t) % S. ``mask`` (T, S) bool says which slots each new token sees after
        that; by default the cache is chronological: slots 0..start - 1 hold the tokens
        before, and new token i sees them and new tokens 0..i. For a graph that reads them,
        ``prev_ids`` (B, n) are the ids before ``ids`` (None: the text starts at ``ids``)."""
        B, T = ids.shape
        S = cache[0].shape[2]
        if mask is None:
            mask = contract.causal_mask(T, start, S)  # (T, S)
        feeds = {contract.INPUT_IDS: ids, contract.POSITION_IDS: positions,
                 contract.CACHE_INDEX: np.full(B, start, dtype=np.int64)}
        if self.prev_ids:
            feeds[contract.PREV_IDS] = self.no_prev_ids(B) if prev_ids is None else prev_ids
        # Contiguous arrays of the graph's types, alive until the call returns (bound, not copied).
        bound = {name: np.ascontiguousarray(a, dtype=np.int64) for name, a in feeds.items()}
        bound[contract.ATTN_MASK] = np.ascontiguousarray(mask, dtype=bool)
        logits = np.empty((B, T, self.vocab_size), dtype=np.float32)
        io = self.session.io_binding()
        for name, array in bound.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        bind_cache(io, cache)
        io.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        return logits

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) of text; an empty text starts a fresh document (the end-of-text token)."""
        ids = self.tokenizer.encode(text)
        return ids if ids.size else np.array([self.tokenizer.eot_id], dtype=np.int64)


def bind_cache(io: ort.IOBinding, cache: list[np.ndarray]) -> None:
    """Bind each cache array as a layer's past and as its present: ONNX Runtime reads it
    and writes the new entries into the same memory, so nothing else of it moves."""
    n_layer = len(cache) // 2
    for past, present, array in zip(contract.past_names(n_layer), contract.present_names(n_layer), cache,
                                    strict=True):
        if not (array.flags.c_contiguous and array.dtype == np.float32):
            raise ValueError("a cache array must be C-contiguous float32 (ChargenModel.new_cache)")
        value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the memory
        io.bind_ortvalue_input(past, value)
        io.bind_ortvalue_output(present, value)


def _json_object(text: str, what: str) -> dict[str, Any]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a JSON object")
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in obj.items()}

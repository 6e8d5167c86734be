"""Running an exported chargen ONNX model with ONNX Runtime: generation and scoring.

This is the inference path: it imports only the standard library, numpy and
onnxruntime (plus the numpy-only vocab, sampling and scoring modules), so
``pip install chargen`` is enough to generate text.

Decoding is incremental: the prompt is encoded once, then each step feeds one new
token per sample and the keys/values of everything before it (the graph's
``present`` outputs fed back as the next ``past``).  Shapes: B samples, H heads,
P cached tokens, D head size, V vocabulary, W the model's context length.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.errors import ChargenError
from pipeline.sampling import check_sampling, sample_next, sample_one
from pipeline.scoring import score_batches, token_nll
from pipeline.vocab import Vocab

FORMAT_VERSION = "1"
REQUIRED_METADATA = ("chargen.format", "chargen.vocab", "chargen.config", "chargen.precision")


class ModelError(ChargenError):
    """A model file is missing, unreadable, or not a chargen ONNX model."""


def count_params(cfg: dict[str, Any]) -> int:
    """Parameter count of a GPT with this config, as ``GPT.num_params()`` counts it.

    Computed from the config because the inference path cannot read ONNX
    initializers without the ``onnx`` package (and int8 weights are repacked).
    """
    V, C, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
    bias = bool(cfg.get("bias", False))
    ln = C * (2 if bias else 1)
    if cfg.get("mlp", "gelu") == "swiglu":
        hidden = int(8 * C / 3 + 31) // 32 * 32
        mlp = C * 2 * hidden + hidden * C + ((2 * hidden + C) if bias else 0)
    else:
        hidden = 4 * C
        mlp = C * hidden + hidden * C + ((hidden + C) if bias else 0)
    attn = 3 * C * C + C * C + (4 * C if bias else 0)
    qk_norm = 2 * (C // cfg["n_head"]) if cfg.get("qk_norm", False) else 0
    per_layer = 2 * ln + attn + mlp + qk_norm
    total = V * C + L * per_layer + ln
    if cfg.get("pos_encoding", "rope") == "learned":
        total += cfg["block_size"] * C
    if not cfg.get("tie_weights", True):
        total += V * C
    return total


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


class ChargenModel:
    """An exported chargen model: its vocabulary, config, metrics and an ORT session."""

    def __init__(self, path: Path, session: ort.InferenceSession, meta: dict[str, str]) -> None:
        self.path = path
        self.session = session
        self.precision = meta["chargen.precision"]
        try:
            self.vocab = Vocab.from_dict(json.loads(meta["chargen.vocab"]))
            self.config: dict[str, Any] = json.loads(meta["chargen.config"])
            self.metrics: dict[str, Any] = json.loads(meta.get("chargen.metrics", "{}"))
            self.n_layer = int(self.config["n_layer"])
            self.n_head = int(self.config["n_head"])
            self.head_size = int(self.config["n_embd"]) // self.n_head
            self.block_size = int(self.config["block_size"])
            self.pos_encoding = str(self.config.get("pos_encoding", "rope"))
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and VocabError are ValueErrors
            raise ModelError(f"{path}: chargen metadata is malformed ({e}); re-export the model") from None
        self._past_names = [f"past.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self._check_signature()
        # id -> text once, so a generation step decodes with a list lookup.
        self._chars = [self.vocab.decode([i]) for i in range(self.vocab.size)]

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> ChargenModel:
        """Open and validate a chargen ONNX file; ModelError says what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a model file" if path.is_dir() else "does not exist"
            raise ModelError(f"model file {path} {what}")
        try:
            session = ort.InferenceSession(
                str(path), session_options(threads), providers=["CPUExecutionProvider"]
            )
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
                "re-create it with `dvc repro` or pass another --model"
            ) from None
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if "chargen.format" not in meta:
            raise ModelError(
                f"{path} is an ONNX model but not a chargen model (no chargen.* metadata); "
                "use a model written by the export or quantize stage"
            )
        if meta["chargen.format"] != FORMAT_VERSION:
            raise ModelError(
                f"{path} uses chargen model format {meta['chargen.format']!r}, this version reads "
                f"{FORMAT_VERSION!r}; re-export it with `dvc repro` or upgrade chargen"
            )
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelError(f"{path}: chargen metadata lacks {', '.join(missing)}; re-export the model")
        return cls(path, session, meta)

    def _check_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = {"input_ids", "position_ids", *self._past_names}
        want_out = {"logits", *(n.replace("past.", "present.", 1) for n in self._past_names)}
        lacking = sorted((want_in - inputs) | (want_out - outputs))
        if lacking:
            raise ModelError(
                f"{self.path}: graph lacks {', '.join(lacking[:3])} (inputs/outputs do not match "
                "its chargen config); re-export the model"
            )

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def num_params(self) -> int:
        return count_params(self.config)

    # ------------------------------------------------------------------ forward

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length keys/values for every layer: 2 * n_layer arrays (B, H, 0, D)."""
        empty = np.zeros((batch, self.n_head, 0, self.head_size), dtype=np.float32)
        return [empty] * (2 * self.n_layer)

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One session call: ids, positions (B, T) int64 and past (B, H, P, D) each ->
        logits (B, T, V) and present (B, H, P + T, D) each."""
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": positions}
        feeds.update(zip(self._past_names, past, strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) of text; an empty text starts a fresh document (the end-of-text token)."""
        ids = self.vocab.encode(text)
        return ids if ids.size else np.array([self.vocab.eot_id], dtype=np.int64)

    # ------------------------------------------------------------------ generation

    def generate_ids(
        self,
        prompt_ids: np.ndarray,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        num_samples: int = 1,
    ) -> Iterator[np.ndarray]:
        """Endless sampling: yields the next token id of every sample, (B,) int64, per step.
        The unknown token is never sampled.

        The context slides once it is full: rotary models keep the last W - 1 cached
        keys/values and keep counting positions (only relative offsets matter);
        learned-position models re-encode the last W tokens at positions 0..W-1.
        """
        check_sampling(temperature, top_k, top_p)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        # Python's Mersenne Twister rather than numpy.random: importing the latter costs
        # ~20 ms of start-up, and B uniforms per step are cheap either way.
        rng = random.Random(seed)
        B, W = num_samples, self.block_size
        ids = np.asarray(prompt_ids, dtype=np.int64)[-W:]  # (T,)
        if ids.size == 0:
            ids = np.array([self.vocab.eot_id], dtype=np.int64)
        T = ids.size
        # The prompt is encoded once for all samples and its cache copied B times.
        logits, present = self.forward(ids[None, :], np.arange(T, dtype=np.int64)[None, :], self.empty_past(1))
        last = np.repeat(logits[:, -1, :], B, axis=0)  # (B, V)
        past = [np.repeat(p, B, axis=0) for p in present]  # (B, H, T, D) each
        pos = T  # position of the next token
        unk = self.vocab.unk_id
        if self.pos_encoding == "rope":
            steps = self._rope_steps(past, pos)
        else:
            steps = self._learned_steps(past, pos, np.tile(ids, (B, 1)))
        next(steps)  # prime the coroutine
        single = B == 1 and top_k == 0 and top_p >= 1.0  # the common case: one stream, plain sampling
        while True:
            # The unknown token stands for "some rare character": printing U+FFFD helps
            # nobody, so it is never sampled.
            last[:, unk] = -np.inf
            if single:
                nxt = np.array([sample_one(last[0], rng.random(), temperature)])  # (1,)
            else:
                u = np.array([rng.random() for _ in range(B)])  # (B,)
                nxt = sample_next(last, u, temperature, top_k, top_p)  # (B,)
            yield nxt
            last = steps.send(nxt)

    def _rope_steps(self, past: list[np.ndarray], pos: int) -> Generator[np.ndarray | None, np.ndarray, None]:
        """Coroutine: receives the new ids (B,), returns the next logits (B, V)."""
        keep = self.block_size - 1
        position = np.empty((past[0].shape[0], 1), dtype=np.int64)
        ring: list[np.ndarray] | None = None
        oldest = 0
        last = None
        while True:
            nxt = yield last
            if ring is None and past[0].shape[2] > keep:
                # The window is full: from now on the cache is a ring of the last W-1
                # entries, (B, H, W-1, D) each. A single new query sees every cached
                # key (the causal mask is all true) and rotary keys carry their own
                # positions, so attention does not depend on the order of the entries:
                # replacing the oldest one in place costs one entry per step instead of
                # copying the whole window.
                ring = [np.ascontiguousarray(p[:, :, -keep:]) for p in past]
                past = ring
            position.fill(pos)
            logits, present = self.forward(nxt[:, None], position, past)  # logits (B, 1, V)
            pos += 1
            if ring is None:
                past = present
            else:
                for r, p in zip(ring, present, strict=True):
                    r[:, :, oldest] = p[:, :, -1]  # (B, H, D): the new token's key/value
                oldest = (oldest + 1) % keep
            last = logits[:, -1, :]

    def _learned_steps(
        self, past: list[np.ndarray], pos: int, history: np.ndarray
    ) -> Generator[np.ndarray | None, np.ndarray, None]:
        """Coroutine for learned positions: cached steps until position W-1, then the
        last W tokens (B, W) are re-encoded each step at positions 0..W-1."""
        B, W = history.shape[0], self.block_size
        full_positions = np.broadcast_to(np.arange(W, dtype=np.int64), (B, W)).copy()  # (B, W)
        empty = self.empty_past(B)
        last = None
        while True:
            nxt = yield last
            history = np.concatenate([history, nxt[:, None]], axis=1)[:, -W:]  # (B, <=W)
            if pos < W:
                logits, past = self.forward(nxt[:, None], np.full((B, 1), pos, np.int64), past)
                pos += 1
            else:
                logits, _ = self.forward(np.ascontiguousarray(history), full_positions, empty)
            last = logits[:, -1, :]

    def generate(
        self,
        prompt: str,
        max_new_chars: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        num_samples: int = 1,
        stop_at_eot: bool = True,
    ) -> Iterator[list[str]]:
        """Yield, step by step, the new character of every sample (B strings).

        A sample that has produced the end-of-text token yields "" from then on
        (with ``stop_at_eot``); generation ends when every sample has stopped or
        after ``max_new_chars`` steps.
        """
        if max_new_chars < 0:
            raise ValueError(f"max_new_chars must be >= 0, got {max_new_chars}")
        if max_new_chars == 0:
            return
        steps = self.generate_ids(self.encode(prompt), temperature, top_k, top_p, seed, num_samples)
        done = np.zeros(num_samples, dtype=bool)  # (B,)
        eot = self.vocab.eot_id
        chars = self._chars
        for _ in range(max_new_chars):
            nxt = next(steps)  # (B,)
            yield ["" if d else chars[i] for d, i in zip(done.tolist(), nxt.tolist(), strict=True)]
            if stop_at_eot:
                done |= nxt == eot
                if done.all():
                    return

    # ------------------------------------------------------------------ scoring

    def score(self, ids: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
        """(total_nats, n_scored) of a token array (N,), windowed as pipeline/scoring.py does."""
        total, n = 0.0, 0
        for x, y, mask in score_batches(np.asarray(ids), self.block_size, batch_size):  # (B, L) each
            positions = np.broadcast_to(np.arange(x.shape[1], dtype=np.int64), x.shape).copy()
            logits, _ = self.forward(x, positions, self.empty_past(x.shape[0]))  # (B, L, V)
            nll = token_nll(logits, y)  # (B, L)
            total += float(nll[mask].sum())
            n += int(mask.sum())
        return total, n


# ---------------------------------------------------------------------- speed


def measure_speed(
    model: ChargenModel, context_chars: int, timed_chars: int, seed: int = 0
) -> dict[str, float]:
    """Single-stream speed with ``context_chars`` characters already in context.

    Returns ``first_char_s`` (prompt encoding plus the first sampled character) and
    ``chars_per_s`` over the next ``timed_chars`` characters, by the wall clock, and
    ``chars_per_s_cpu`` by this process's CPU time, which stays meaningful while
    other jobs share the cores.  The context is random vocabulary characters: speed
    does not depend on what the text says.
    """
    rng = random.Random(seed)
    specials = {model.vocab.eot_id, model.vocab.unk_id}
    plain = [i for i in range(model.vocab_size) if i not in specials]
    prompt = np.array(rng.choices(plain, k=max(1, context_chars)), dtype=np.int64)  # (context_chars,)
    t0 = time.perf_counter()
    steps = model.generate_ids(prompt, seed=seed)
    next(steps)
    t1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(timed_chars):
        next(steps)
    t2, cpu2 = time.perf_counter(), time.process_time()
    return {
        "first_char_s": t1 - t0,
        "chars_per_s": timed_chars / max(t2 - t1, 1e-9),
        "chars_per_s_cpu": timed_chars / max(cpu2 - cpu1, 1e-9),
    }

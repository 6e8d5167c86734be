"""Export a trained GPT to one self-contained ONNX graph with a key/value cache.

The graph takes the new token ids, their absolute positions and the past keys and
values of every layer (the past may be empty), and returns logits and the present
keys and values.  One graph serves the first call and every cached step, so
quantization tools see every MatMul (they skip the subgraphs of an ``If``).

Before anything is written, ONNX Runtime's logits are checked against PyTorch's
*uncached* forward pass: a wrong causal mask on the cached path, or any other
export bug, fails the export instead of shipping a model that rambles.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from pipeline.atomic import write_bytes
from pipeline.errors import ChargenError
from pipeline.jsonfile import read_object
from pipeline.model import GPT, CausalSelfAttention, GPTConfig

FORMAT_VERSION = "1"
# RotaryEmbedding and Attention (with a KV cache) are standard ONNX ops from opset 23.
OPSET = 23
# Ops that carry subgraphs; their bodies are invisible to quantize_dynamic.
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}


class ExportError(ChargenError):
    """The exported graph failed a check (structure or numerical parity)."""


def input_names(n_layer: int) -> list[str]:
    past = [f"past.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["logits", *present]


class ExportAttention(CausalSelfAttention):
    """The cached attention path as two fused ONNX (opset 23) nodes; same weights, same maths.

    At one new character per call the graph's cost is mostly per-node overhead, not
    arithmetic, so q and k are rotated by one ``RotaryEmbedding`` node and attention
    with the cache (concatenating past and new keys/values into the present) is one
    ``Attention`` node, both working on (B, T, heads * D) without transposes.  The
    written-out alternative costs a dozen small nodes per layer, and those are the
    same in fp32 and int8, so they also dilute what int8 MatMuls gain.

    ``rope`` is (cos, sin), each (B, T, D/2), or None for learned positions; ``mask``
    (T, S) is True where new query i (cache index P + i) may see key j, i.e. j <= P + i.
    The parity check proves the graph equal to the model's own forward.
    """

    def forward(self, x, rope, past, mask):
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_size
        qk, v = self.qkv(x).split((2 * C, C), dim=2)  # (B, T, 2C), (B, T, C)
        if self.cfg.qk_norm:
            q, k = qk.view(B, T, 2, H, D).unbind(2)  # (B, T, H, D) each
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2).view(B, T, 2 * C)
        if rope is not None:
            # One rotation for q and k together: 2H heads sharing the positions' angles.
            qk = torch.onnx.ops.rotary_embedding(qk, *rope, num_heads=2 * H)  # (B, T, 2C)
        q, k = qk.split(C, dim=2)  # (B, T, C) each
        y, key, value, _ = torch.onnx.ops.attention(
            q, k, v, mask, past[0], past[1], q_num_heads=H, kv_num_heads=H
        )  # y (B, T, C); key, value (B, H, S, D)
        return self.proj(y), (key, value)


class CachedGPT(nn.Module):
    """What is traced: flat tensor inputs/outputs, the past always passed.

    Holds a copy of ``model`` whose attention layers use ``attention`` (by default
    :class:`ExportAttention`).  ``forward`` is ``GPT.forward`` and ``Block.forward``
    written out for the graph: the rotary angles and the causal mask are computed
    once for all layers, and relu² squares with a Mul.  The past is always passed,
    even when empty, so one graph serves the first call and every cached step with
    the lower-right causal mask.
    """

    def __init__(self, model: GPT, attention: type[CausalSelfAttention] = ExportAttention) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for block in self.model.blocks:
            block.attn.__class__ = attention  # same parameters, different forward

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *flat_past: torch.Tensor):
        m = self.model
        T = input_ids.shape[1]
        P = flat_past[0].shape[2]
        x = m.wte(input_ids)  # (B, T, C)
        rope = None
        if m.wpe is not None:
            x = x + m.wpe(position_ids)
        else:
            angles = position_ids.unsqueeze(-1).float() * m.inv_freq  # (B, T, D/2)
            rope = (angles.cos(), angles.sin())
        # Lower-right aligned causal mask: new query i (cache index P + i) sees keys 0..P+i.
        mask = torch.arange(P + T).unsqueeze(0) <= torch.arange(T).unsqueeze(1) + P  # (T, S)
        present = []
        for i, block in enumerate(m.blocks):
            a, kv = block.attn(block.ln_1(x), rope, (flat_past[2 * i], flat_past[2 * i + 1]), mask)
            x = x + a
            x = x + _mlp(block.mlp, block.ln_2(x))
            present.extend(kv)
        logits = m.lm_head(m.ln_f(x))  # (B, T, V)
        return (logits, *present)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``MLP.forward`` in eval mode, with relu² as relu(h) * relu(h): a Mul, not a Pow."""
    if mlp.kind != "relu2":
        return mlp(x)
    h = torch.relu(mlp.fc(x))  # (B, T, 4C)
    return mlp.proj(h * h)


def metadata(model: GPT, vocab: Mapping[str, Any], metrics: Mapping[str, Any], precision: str) -> dict[str, str]:
    """The ``chargen.*`` metadata_props that make the file self-contained."""
    return {
        "chargen.format": FORMAT_VERSION,
        "chargen.vocab": json.dumps(dict(vocab), ensure_ascii=False),
        "chargen.config": json.dumps(model.cfg.to_dict()),
        "chargen.metrics": json.dumps(finite(metrics)),
        "chargen.precision": precision,
    }


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace metadata entries with the same keys, keep the others."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        proto.metadata_props.add(key=key, value=value)


def _vocab_dict(vocab: Any) -> dict:
    # checkpoint.load_model returns a Vocab object; tests and scripts may pass the dict.
    return vocab.to_dict() if hasattr(vocab, "to_dict") else dict(vocab)


def _check_vocab(vocab: dict, vocab_size: int) -> None:
    tokens = vocab.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != vocab_size:
        got = len(tokens) if isinstance(tokens, list) else "no"
        raise ExportError(
            f"vocabulary has {got} tokens but the model expects {vocab_size}; "
            "re-run encode and train so the checkpoint and data/encoded/vocab.json match"
        )
    for key in ("eot_id", "unk_id"):
        if not isinstance(vocab.get(key), int) or not 0 <= vocab[key] < vocab_size:
            raise ExportError(f"vocabulary '{key}' is missing or out of range; re-run encode")


def _example_inputs(cfg: GPTConfig) -> tuple[torch.Tensor, ...]:
    # Sizes of 0 or 1 get specialised by torch.export, so trace with B=2, T=3, P=5.
    B, T, P = 2, 3, 5
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    past = [torch.zeros(B, cfg.n_head, P, cfg.head_size) for _ in range(2 * cfg.n_layer)]
    return (ids, pos, *past)


def to_onnx(graph: CachedGPT, opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``graph`` into an optimised single ONNX graph, no metadata yet."""
    # The exporter reports progress and internal deprecations on stdout, stderr and
    # its loggers; a stage's output should be its own (real failures still raise).
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _export(graph, opset)
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    # Per-node stack traces hold local file paths and bloat the file; drop them.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.producer_name = "chargen"
    return proto


def _export(graph: CachedGPT, opset: int):
    from torch.export import Dim

    cfg = graph.model.cfg
    n_layer = cfg.n_layer
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    past_axes = {0: batch, 2: past}
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "flat_past": tuple(past_axes for _ in range(2 * n_layer)),
    }
    return torch.onnx.export(
        graph.eval(),
        _example_inputs(cfg),
        dynamo=True,
        input_names=input_names(n_layer),
        output_names=output_names(n_layer),
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        optimize=True,  # constant folding and graph clean-up
        external_data=False,
        verbose=False,
    )


def check_structure(proto: onnx.ModelProto) -> None:
    """One flat graph, valid ONNX, weights embedded."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph is not valid ONNX ({str(e).splitlines()[0]})") from None
    nested = sorted({n.op_type for n in proto.graph.node if n.op_type in CONTROL_FLOW_OPS})
    if nested:
        raise ExportError(f"exported graph contains {', '.join(nested)} nodes; expected one flat graph")
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"exported graph stores weights in an external file ({external[0]})")


def parity_prompts(vocab_size: int, block_size: int, seed: int = 0) -> np.ndarray:
    """Three random token sequences (3, L) for the parity check, L <= block_size."""
    length = min(block_size, 24)
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(3, length), dtype=np.int64)


def max_parity_error(model: GPT, session: ort.InferenceSession) -> float:
    """Largest |ONNX - PyTorch| logit difference over a full prompt and cached steps.

    The reference is always PyTorch's uncached forward over the whole sequence so
    far (the training path, fused causal attention), so a wrong mask on the cached
    path shows up even if the PyTorch model itself has it.  Covers: a full prompt
    with an empty past, single-token and multi-token cached steps with batch 1, and
    a multi-token then single-token step with batch 3.
    """
    cfg = model.cfg
    ids = parity_prompts(cfg.vocab_size, cfg.block_size)
    L = ids.shape[1]
    cuts = sorted({0, L // 2, L // 2 + 1, L // 2 + 2, L - 1, L})  # feed ids[:, a:b] each call
    runs = [(ids[:1], 0), (ids, 0)]  # (rows, first position): batch 1, then batch 3
    if cfg.pos_encoding == "rope":
        # Positions far past block_size, as after the runtime's window has slid.
        runs.append((ids[:1], 8 * cfg.block_size))

    worst = 0.0
    for rows, offset in runs:
        B = rows.shape[0]
        positions = np.broadcast_to(np.arange(offset, offset + L), (B, L)).copy()
        empty = np.zeros((B, cfg.n_head, 0, cfg.head_size), dtype=np.float32)
        past = [empty] * (2 * cfg.n_layer)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            feed = {"input_ids": rows[:, a:b], "position_ids": np.ascontiguousarray(positions[:, a:b])}
            feed.update(zip(input_names(cfg.n_layer)[2:], past, strict=True))
            logits, *past = session.run(None, feed)
            with torch.no_grad():  # uncached: the whole sequence so far, fused causal kernel
                want, _ = model(torch.from_numpy(rows[:, :b]), positions=torch.from_numpy(positions[:, :b]))
            worst = max(worst, float(np.abs(logits - want[:, a:b].float().numpy()).max()))
    return worst


def export_onnx(
    model: GPT,
    vocab: dict,
    path: str | Path,
    metrics: dict,
    opset: int = OPSET,
    atol: float = 1e-4,
    graph: CachedGPT | None = None,
) -> float:
    """Export, verify against PyTorch and atomically write ``path`` (fp32, with metadata).

    ``graph`` is the module traced into ONNX, by default ``CachedGPT(model)``; the
    parity reference is always ``model``'s own uncached forward.  Raises ExportError
    (nothing written) when the graph is not one flat valid graph or its logits
    differ from PyTorch's by more than ``atol``.  Returns the largest difference seen.
    """
    vocab = _vocab_dict(vocab)
    _check_vocab(vocab, model.cfg.vocab_size)
    # Export a float32 CPU copy in eval mode; the caller's model is left untouched.
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    if graph is None:
        graph = CachedGPT(model)
    proto = to_onnx(graph.to(device="cpu", dtype=torch.float32), opset)
    set_metadata(proto, metadata(model, vocab, metrics, "fp32"))
    check_structure(proto)
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    err = max_parity_error(model, session)
    if not err <= atol:  # also catches NaN
        raise ExportError(
            f"ONNX Runtime logits differ from PyTorch by {err:.3g} (allowed {atol:g}); "
            "the exported graph is wrong, no model was written"
        )
    write_bytes(path, data)
    return err


def finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON: NaN/inf (e.g. an unknown training time) become null."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in metrics.items()
    }


def export_checkpoint(
    checkpoint: str | Path,
    vocab_path: str | Path,
    metrics_path: str | Path,
    out: str | Path,
    opset: int = OPSET,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """The export stage: checkpoint + evaluation metrics -> verified fp32 ONNX file.

    Returns a summary (``path``, ``size_bytes``, ``max_abs_diff``, ``num_params``).
    """
    from pipeline.checkpoint import load_model

    model, vocab, info = load_model(checkpoint)
    vocab = _vocab_dict(vocab)
    data_vocab = read_object(vocab_path, ExportError, "vocabulary", "run the encode stage")
    if data_vocab.get("tokens") != vocab["tokens"]:
        raise ExportError(
            f"{checkpoint} was trained on a different vocabulary than {vocab_path}; "
            "re-run the train stage (dvc repro train)"
        )
    evaluated = read_object(metrics_path, ExportError, "evaluation metrics", "run the evaluate stage")
    metrics = finite({"step": info.get("step"), "best_val_loss": info.get("best_val_loss"), **evaluated})
    err = export_onnx(model, vocab, out, metrics, opset=opset, atol=atol)
    return {
        "path": str(out),
        "size_bytes": Path(out).stat().st_size,
        "max_abs_diff": err,
        "num_params": model.num_params(),
    }

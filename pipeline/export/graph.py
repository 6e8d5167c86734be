"""The ONNX graph of a trained GPT: one flat graph with a key/value cache, and its checks.

The graph takes the new token ids, their absolute positions, the attention mask and the
past keys and values of every layer (the past may be empty), and returns logits and the present
keys and values, named as ``chargen.contract`` says. One graph serves the first call
and every cached step, so quantization tools see every MatMul (they skip the
subgraphs of an ``If``).

``max_parity_error`` checks ONNX Runtime's logits against PyTorch's *uncached*
forward pass: a wrong causal mask on the cached path, or any other export bug,
fails the export instead of shipping a model that rambles.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from chargen import contract
from chargen.errors import ChargenError
from pipeline.model import GPT, NGRAM_CONTEXT, CausalSelfAttention, GPTConfig


class ExportError(ChargenError):
    """The exported graph failed a check (structure or numerical parity)."""


class ExportAttention(CausalSelfAttention):
    """The cached attention path as fused ONNX nodes; same weights, same maths.

    At one new character per call the graph's cost is mostly per-node overhead and
    moving the cache, not arithmetic. So q and k are rotated by one ``RotaryEmbedding``
    node; one ``TensorScatter`` per cache writes the new keys (values) into their slots;
    and one ``Attention`` node attends over every slot under the mask. The cache keeps
    its size from call to call, so ONNX Runtime updates it in place when its output is
    bound to its input, where an ``Attention`` with a past input copies past and new
    entries into a fresh present every call. The cache is laid out heads first
    (B, H, S, D), the layout the ``Attention`` kernel works in: a (B, S, H * D) cache
    would be transposed whole inside every call, which costs a batch of 32 more than the
    two transposes of the new tokens cost one stream. The written-out alternative costs
    a dozen small nodes per layer, and those are the same in fp32 and int8, so they also
    dilute what int8 MatMuls gain.

    ``rope`` is (cos, sin), each (B, T, D/2), or None for learned positions; ``past`` is
    (key cache, value cache, cache_index): (B, H, S, D) twice and (B,); ``mask`` (T, S) is
    the graph's ``attn_mask`` input: True where new query i may see slot j after the write.
    The parity check proves the graph equal to the model's own forward.
    """

    def forward(self, x, rope, past, mask):  # noqa: D102 - CausalSelfAttention.forward's contract
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_size
        qkv = self.qkv(x).unflatten(2, (3 * H, D)).transpose(1, 2)  # (B, 3H, T, D): heads first, as the cache
        qk, v = qkv.split((2 * H, H), dim=1)  # (B, 2H, T, D), (B, H, T, D)
        if self.cfg.qk_norm:
            q, k = qk.split(H, dim=1)  # (B, H, T, D) each
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        if rope is not None:
            # One rotation for q and k together: 2H heads sharing the positions' angles.
            qk = torch.onnx.ops.rotary_embedding(qk, *rope)  # (B, 2H, T, D)
        q, k = qk.split(H, dim=1)  # (B, H, T, D) each
        cache_k, cache_v, index = past
        key, value = (_scatter(cache, new, index) for cache, new in ((cache_k, k), (cache_v, v)))  # (B, H, S, D)
        y, *_ = torch.onnx.ops.attention(q, key, value, mask)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).flatten(2)), (key, value)  # (B, T, C)


def _scatter(cache: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """ONNX ``TensorScatter``: ``cache`` (B, H, S, D) with new (B, H, T, D) written to slots
    index[b] + t (mod S). Only its ONNX form is ever run."""
    return torch.onnx.ops.symbolic(
        "::TensorScatter", (cache, new, index), {"axis": 2, "mode": "circular"},
        dtype=cache.dtype, shape=cache.shape, version=contract.OPSET,
    )


class CachedGPT(nn.Module):
    """What is traced: ``GPT.forward`` with flat tensor inputs/outputs and the cache always passed.

    Holds a copy of ``model`` whose attention layers use ``attention`` (by default
    :class:`ExportAttention`): the same parameters and the model's own forward, with
    each layer's attention as fused ONNX ops. The cache is always passed, with room for
    the new tokens, so one graph serves the first call and every cached step; the mask
    says which slots each new token sees.
    """

    def __init__(self, model: GPT, attention: type[CausalSelfAttention] = ExportAttention) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for block in self.model.blocks:
            block.attn.__class__ = attention  # same parameters, different forward

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor,
                cache_index: torch.Tensor, *inputs: torch.Tensor):
        # With n-gram tables, the ids before input_ids (B, 2) come first; then the cache.
        prev_ids, flat = (inputs[0], inputs[1:]) if self.model.ngram is not None else (None, inputs)
        # Per layer (key cache, value cache, where the new entries go): ExportAttention's past.
        past = [(k, v, cache_index) for k, v in zip(flat[0::2], flat[1::2], strict=True)]
        logits, present = self.model(input_ids, past, position_ids, prev_ids, attn_mask)  # (B, T, V), (B, H, S, D)
        return (logits, *(t for kv in present for t in kv))


def _example_inputs(cfg: GPTConfig) -> tuple[torch.Tensor, ...]:
    # Sizes of 0 or 1 get specialised by torch.export, so trace with B=2, T=3, S=8.
    B, T, S = 2, 3, 8
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.arange(T).expand(B, T).contiguous()
    mask = torch.ones(T, S, dtype=torch.bool).tril()  # (T, S)
    index = torch.zeros(B, dtype=torch.long)
    prev = [torch.zeros(B, NGRAM_CONTEXT, dtype=torch.long)] if cfg.ngram else []
    cache = [torch.zeros(B, cfg.n_head, S, cfg.head_size) for _ in range(2 * cfg.n_layer)]
    return (ids, pos, mask, index, *prev, *cache)


def to_onnx(graph: CachedGPT, opset: int = contract.OPSET) -> onnx.ModelProto:
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
    batch, seq, slots = Dim("batch"), Dim("seq"), Dim("slots")
    cache_axes = {0: batch, 2: slots}
    prev_axes = ({0: batch},) if cfg.ngram else ()
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attn_mask": {0: seq, 1: slots},
        "cache_index": {0: batch},
        "inputs": (*prev_axes, *(cache_axes for _ in range(2 * n_layer))),
    }
    return torch.onnx.export(
        graph.eval(),
        _example_inputs(cfg),
        dynamo=True,
        input_names=contract.input_names(n_layer, cfg.ngram),
        output_names=contract.output_names(n_layer),
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        optimize=True,  # constant folding and graph clean-up
        external_data=False,
        verbose=False,
    )


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
    into an empty cache, single-token and multi-token cached steps with batch 1, and
    a multi-token then single-token step with batch 3; the cache has L slots, filled
    in order, and each call's ``present`` is the next call's ``past``.
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
        past = [np.zeros((B, cfg.n_head, L, cfg.head_size), dtype=np.float32)] * (2 * cfg.n_layer)  # (B, H, S, D)
        # The ids before each call's first new id; "no token" before the sequence.
        padded = np.concatenate([np.full((B, NGRAM_CONTEXT), cfg.vocab_size), rows], axis=1)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            feed = {contract.INPUT_IDS: rows[:, a:b],
                    contract.POSITION_IDS: np.ascontiguousarray(positions[:, a:b]),
                    contract.ATTN_MASK: contract.causal_mask(b - a, a, L),  # (T, S)
                    contract.CACHE_INDEX: np.full(B, a, dtype=np.int64)}
            if cfg.ngram:
                feed[contract.PREV_IDS] = np.ascontiguousarray(padded[:, a : a + NGRAM_CONTEXT])
            feed.update(zip(contract.past_names(cfg.n_layer), past, strict=True))
            logits, *past = session.run(None, feed)
            with torch.no_grad():  # uncached: the whole sequence so far, fused causal kernel
                want, _ = model(torch.from_numpy(rows[:, :b]), positions=torch.from_numpy(positions[:, :b]))
            worst = max(worst, float(np.abs(logits - want[:, a:b].float().numpy()).max()))
    return worst



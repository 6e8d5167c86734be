"""Export: the ONNX contract, the parity check (which must catch a wrong cached mask),
metadata round-trips, and the export stage run as DVC runs it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_METRICS, run_stage_script, tiny_config, tiny_draft

from chargen import contract
from chargen.contract import input_names, output_names
from chargen.tokenizers import CharTokenizer, from_description
from pipeline.export.graph import CachedGPT, ExportAttention, ExportError, max_parity_error
from pipeline.export.model_file import export_onnx
from pipeline.params import load_params


def dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_follows_the_contract(tiny_models):
    proto = onnx.load(str(tiny_models.fp32))
    cfg = tiny_models.model.cfg
    L, H, D = cfg.n_layer, cfg.n_head, cfg.head_size
    inputs = {i.name: dims(i) for i in proto.graph.input}
    outputs = {o.name: dims(o) for o in proto.graph.output}
    assert list(inputs) == input_names(L, prev_ids=cfg.ngram)
    assert list(outputs) == output_names(L)
    batch, seq = inputs["input_ids"]
    assert isinstance(batch, str) and isinstance(seq, str)  # dynamic axes
    assert inputs["position_ids"] == [batch, seq]
    mask_rows, mask_keys = inputs[contract.ATTN_MASK]
    assert mask_rows == seq and isinstance(mask_keys, str) and mask_keys not in (batch, seq)
    assert next(i for i in proto.graph.input if i.name == contract.ATTN_MASK).type.tensor_type.elem_type \
        == onnx.TensorProto.BOOL
    assert inputs[contract.CACHE_INDEX] == [batch]
    past = inputs["past_key_values.0.key"]
    assert past == [batch, H, mask_keys, D]  # the mask has a column per cache slot
    assert outputs["present.0.key"] == past  # the cache keeps its size: updated in place when bound
    assert outputs["logits"] == [batch, seq, cfg.vocab_size]
    # One flat graph with embedded weights: no control flow, no external data file.
    assert not {n.op_type for n in proto.graph.node} & {"If", "Loop", "Scan"}
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto)


def test_attention_is_one_fused_node_per_layer(tiny_models):
    """Per-node overhead dominates a one-character step: each layer's attention is one
    Attention node, its rotation one RotaryEmbedding node, and the writes into its cache
    one TensorScatter node each for keys and values."""
    proto = onnx.load(str(tiny_models.fp32))
    ops = [n.op_type for n in proto.graph.node]
    L = tiny_models.model.cfg.n_layer
    assert ops.count("Attention") == L and ops.count("RotaryEmbedding") == L and ops.count("TensorScatter") == 2 * L
    assert "Softmax" not in ops and "Pow" not in ops
    weights = {t.name for t in proto.graph.initializer}  # the tied output layer transposes a weight
    # Heads first and back: the new tokens' q, k, v into the cache's layout, the output out of it.
    moved = [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] not in weights]
    assert len(moved) == 2 * L


def test_metadata_round_trips(tiny_models):
    meta = {p.key: p.value for p in onnx.load(str(tiny_models.fp32)).metadata_props}
    assert meta[contract.META_FORMAT] == contract.FORMAT_VERSION == "4"
    assert meta[contract.META_PRECISION] == "fp32"
    assert json.loads(meta[contract.META_TOKENIZER]) == tiny_models.tokenizer.describe()
    model = tiny_models.model
    assert json.loads(meta[contract.META_CONFIG]) == {**model.cfg.to_dict(), "num_params": model.num_params()}
    assert json.loads(meta[contract.META_METRICS]) == TINY_METRICS
    # The tokenizer is rebuilt from the file alone and encodes like the original.
    rebuilt = from_description(json.loads(meta[contract.META_TOKENIZER]))
    text = "the cat sat on the mat. Zebra!"
    assert np.array_equal(rebuilt.encode(text), tiny_models.tokenizer.encode(text))


def test_the_same_model_exports_to_the_same_bytes(tiny_models, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    draft = tiny_draft(tiny_models.tokenizer)
    export_onnx(tiny_models.model, tiny_models.tokenizer, a, TINY_METRICS, draft=draft)
    export_onnx(tiny_models.model, tiny_models.tokenizer, b, TINY_METRICS, draft=draft)
    assert a.read_bytes() == b.read_bytes() == tiny_models.fp32.read_bytes()


def test_exported_logits_match_pytorch_with_the_cache(tiny_models):
    session = ort.InferenceSession(str(tiny_models.fp32), providers=["CPUExecutionProvider"])
    assert max_parity_error(tiny_models.model, session) <= 1e-4


class UpperLeftMaskAttention(ExportAttention):
    """A classic KV-cache bug: a causal mask aligned upper-left (what ``is_causal`` gives
    with a past), so a new token cannot see most of the cache."""

    def forward(self, x, rope, past, mask):
        T, S = mask.shape
        upper_left = torch.arange(S).unsqueeze(0) <= torch.arange(T).unsqueeze(1)  # (T, S)
        return super().forward(x, rope, past, upper_left)


def test_parity_check_catches_an_upper_left_cached_mask(tiny_models, tmp_path):
    out = tmp_path / "broken.onnx"
    broken = CachedGPT(tiny_models.model, attention=UpperLeftMaskAttention)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(tiny_models.model, tiny_models.tokenizer, out, {}, graph=broken)
    assert list(tmp_path.iterdir()) == []  # no output, no temp file left behind


def test_export_parity_for_the_other_model_options(tiny_models, tmp_path):
    """Learned positions, qk-norm, SwiGLU, biases and untied embeddings go through the
    same export attention; an untrained model is enough for parity."""
    from pipeline.model import GPT

    torch.manual_seed(0)
    cfg = tiny_config(tiny_models.tokenizer.size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      pos_encoding="learned", qk_norm=True, mlp="swiglu", bias=True, tie_weights=False)
    model = GPT(cfg).eval()
    err = export_onnx(model, tiny_models.tokenizer, tmp_path / "m.onnx", {})
    assert err <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert max_parity_error(model, session) == err


def test_export_parity_with_ngram_tables_and_a_logit_cap(tiny_models, tmp_path):
    """The n-gram tables read ``prev_ids`` (B, 2), an extra input; random tables, since
    zero-initialised ones would hide a wrong index."""
    from pipeline.model import GPT

    torch.manual_seed(0)
    cfg = tiny_config(tiny_models.tokenizer.size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      bigram=True, trigram_buckets=37, logit_cap=3.0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.ngram.bigram.weight.normal_()
        model.ngram.trigram.weight.normal_()
    err = export_onnx(model, tiny_models.tokenizer, tmp_path / "m.onnx", {})
    assert err <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in proto.graph.input] == input_names(1, prev_ids=True)
    assert dims(proto.graph.input[4])[1] == 2  # prev_ids (B, 2)
    assert [n.op_type for n in proto.graph.node].count("Gather") == 3  # token, bigram, trigram rows


def test_export_refuses_a_vocabulary_that_does_not_fit(tiny_models, tmp_path):
    smaller = CharTokenizer(tiny_models.tokenizer.tokens[:-1])
    with pytest.raises(ExportError, match="tokens but the model expects"):
        export_onnx(tiny_models.model, smaller, tmp_path / "m.onnx", {})
    assert list(tmp_path.iterdir()) == []


def test_export_stage(tiny_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    done = run_stage_script("export", project, "--params", "params.yaml")
    assert done.returncode == 0, done.stderr
    assert "matches PyTorch" in done.stdout
    meta = {p.key: p.value for p in onnx.load(str(project / "models" / "model.fp32.onnx")).metadata_props}
    assert json.loads(meta[contract.META_METRICS]) == json.loads((project / "metrics" / "eval.json").read_text())
    draft = json.loads(meta[contract.META_DRAFT])  # the train split's table, as params.yaml sizes it
    export = load_params(project / "params.yaml").export
    assert (draft["context"], draft["bits"], draft["encoding"]) == (export.draft_context, export.draft_bits, "zlib")


def test_export_stage_without_evaluation_metrics_fails_cleanly(tiny_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    (project / "metrics" / "eval.json").unlink()
    done = run_stage_script("export", project)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith("error: ") and "evaluate" in done.stderr
    assert not (project / "models").exists()

"""Quantize: the int8 and int4 models keep the contract and metadata, hold quantized weights,
load, generate and score close to fp32; int4 is the smallest; bad inputs fail with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import quantize_params, run_stage_script

from chargen import contract
from chargen.generate import generate
from chargen.model import ChargenModel
from chargen.scoring import score
from pipeline.export.quantize import (
    QuantizeError,
    float_weight_matmuls,
    quantize_int4,
    quantize_int8,
)


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_weights_and_metadata(tiny_models):
    fp32, int8 = onnx.load(str(tiny_models.fp32)), onnx.load(str(tiny_models.int8))
    assert float_weight_matmuls(fp32)  # the check sees the fp32 weight MatMuls...
    assert float_weight_matmuls(int8) == []  # ...and none are left after quantization
    ops = {n.op_type for n in int8.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert [i.name for i in int8.graph.input] == [i.name for i in fp32.graph.input]
    assert [o.name for o in int8.graph.output] == [o.name for o in fp32.graph.output]
    assert tiny_models.int8.stat().st_size < 0.6 * tiny_models.fp32.stat().st_size
    before, after = metadata(tiny_models.fp32), metadata(tiny_models.int8)
    assert after[contract.META_PRECISION] == "int8"
    for key in (contract.META_FORMAT, contract.META_TOKENIZER, contract.META_CONFIG, contract.META_METRICS):
        assert after[key] == before[key]


def test_the_same_fp32_model_quantizes_to_the_same_bytes(tiny_models, tmp_path):
    quantize_int8(tiny_models.fp32, tmp_path / "again.onnx", quantize_params())
    assert (tmp_path / "again.onnx").read_bytes() == tiny_models.int8.read_bytes()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_model_loads_generates_and_scores_close_to_fp32(tiny_models, precision):
    fp32 = ChargenModel.load(tiny_models.fp32)
    small = ChargenModel.load(getattr(tiny_models, precision))
    assert small.precision == precision and small.tokenizer == tiny_models.tokenizer
    text = "".join(c[0] for c in generate(small, "the ", 60, temperature=0.5, seed=3, stop_at_eot=False))
    assert len(text) == 60
    words = set(tiny_models.text.split())
    assert sum(w in words for w in text.split()) >= 3  # trained text, not noise

    ids = fp32.tokenizer.encode(tiny_models.text[:400])
    loss32, n = score(fp32, ids)
    loss_q, n_q = score(small, ids)
    assert n == n_q == ids.size - 1
    assert abs(loss_q / n - loss32 / n) < 0.05
    x = ids[None, :32]
    pos = np.arange(32)[None]
    l32 = fp32.forward(x, pos, fp32.new_cache(1, 32))
    lq = small.forward(x, pos, small.new_cache(1, 32))
    assert (l32.argmax(-1) == lq.argmax(-1)).mean() > 0.9


def test_int4_weights_metadata_and_size(tiny_models, tmp_path):
    fp32, int4 = onnx.load(str(tiny_models.fp32)), onnx.load(str(tiny_models.int4))
    assert float_weight_matmuls(int4) == []
    ops = {n.op_type for n in int4.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops and "Gather" not in ops
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == quantize_params().int4_block_size for n in nbits)
    assert [i.name for i in int4.graph.input] == [i.name for i in fp32.graph.input]
    assert [o.name for o in int4.graph.output] == [o.name for o in fp32.graph.output]
    assert tiny_models.int4.stat().st_size < tiny_models.int8.stat().st_size
    before, after = metadata(tiny_models.fp32), metadata(tiny_models.int4)
    assert after[contract.META_PRECISION] == "int4"
    for key in (contract.META_FORMAT, contract.META_TOKENIZER, contract.META_CONFIG, contract.META_METRICS):
        assert after[key] == before[key]
    quantize_int4(tiny_models.fp32, tmp_path / "again.onnx", quantize_params())
    assert (tmp_path / "again.onnx").read_bytes() == tiny_models.int4.read_bytes()  # deterministic
    quantize_int4(tiny_models.fp32, tmp_path / "b16.onnx", quantize_params(int4_block_size=16))
    smaller_blocks = onnx.load(str(tmp_path / "b16.onnx"))
    assert {a.i for n in smaller_blocks.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"} == {16}


def test_quantize_refuses_what_is_not_a_chargen_fp32_model(tiny_models, tmp_path):
    with pytest.raises(QuantizeError, match="not a chargen fp32 model"):
        quantize_int8(tiny_models.int8, tmp_path / "again.onnx", quantize_params())
    with pytest.raises(QuantizeError, match="not a chargen fp32 model"):
        quantize_int4(tiny_models.int4, tmp_path / "again.onnx", quantize_params())
    with pytest.raises(QuantizeError, match="not found; run the export stage"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", quantize_params())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_models.fp32.read_bytes()[:1000])
    with pytest.raises(QuantizeError, match="not a readable ONNX file"):
        quantize_int8(truncated, tmp_path / "out.onnx", quantize_params())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.onnx"]


def test_quantize_stage(tiny_project, tiny_models, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    (project / "models").mkdir()
    shutil.copy(tiny_models.fp32, project / "models" / "model.fp32.onnx")
    done = run_stage_script("quantize", project)
    assert done.returncode == 0, done.stderr
    for precision in ("int8", "int4"):
        path = contract.model_path(precision, project / "models")
        assert metadata(path)[contract.META_PRECISION] == precision
        assert json.loads(metadata(path)[contract.META_CONFIG])["n_layer"] == 2
        assert path.read_bytes() == getattr(tiny_models, precision).read_bytes()


def test_quantize_stage_rejects_bad_params(tiny_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    params = (project / "params.yaml").read_text(encoding="utf-8")
    (project / "params.yaml").write_text(params.replace("- MatMul", "- Conv"), encoding="utf-8")
    done = run_stage_script("quantize", project)
    assert done.returncode == 1
    assert done.stderr.startswith("error: quantize.op_types") and done.stderr.count("\n") == 1
    (project / "params.yaml").write_text(params.replace("int4_block_size: 64", "int4_block_size: 48"),
                                         encoding="utf-8")
    done = run_stage_script("quantize", project)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: quantize.int4_block_size: must be a power of two")
    assert not (project / "models").exists()

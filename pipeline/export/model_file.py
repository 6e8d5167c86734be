"""Writing a chargen model file: the verified ONNX graph plus the metadata of the contract.

The file is self-contained: the tokenizer description, the model's shape, its
parameter count and the evaluation metrics travel in its ``metadata_props``
(``chargen.contract``), so the runtime needs nothing else. Nothing that changes
from run to run (times, speeds) goes in, so the same checkpoint and metrics always
give the same bytes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from chargen import contract
from chargen.draft import NGramDraft
from chargen.tokenizers import Tokenizer
from pipeline.export.draft import train_draft
from pipeline.export.graph import CachedGPT, ExportError, max_parity_error, to_onnx
from pipeline.export.proto import check_structure, set_metadata
from pipeline.files import read_json_object, write_bytes
from pipeline.model import GPT


def metadata(
    model: GPT, tokenizer: Tokenizer, metrics: Mapping[str, Any], precision: str,
    origin: Mapping[str, Any] | None = None, draft: NGramDraft | None = None,
) -> dict[str, str]:
    """The ``chargen.*`` metadata_props that make the file self-contained."""
    props = {
        contract.META_FORMAT: contract.FORMAT_VERSION,
        contract.META_TOKENIZER: json.dumps(tokenizer.describe(), ensure_ascii=False),
        contract.META_CONFIG: json.dumps({**model.cfg.to_dict(), "num_params": model.num_params()}),
        contract.META_METRICS: json.dumps(finite(metrics)),
        contract.META_PRECISION: precision,
    }
    if origin:
        props[contract.META_ORIGIN] = json.dumps(finite(origin), ensure_ascii=False)
    if draft is not None:
        props[contract.META_DRAFT] = json.dumps(draft.describe())
    return props


def finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON: NaN/inf become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def export_onnx(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    metrics: Mapping[str, Any],
    opset: int = contract.OPSET,
    atol: float = 1e-4,
    graph: CachedGPT | None = None,
    origin: Mapping[str, Any] | None = None,
    draft: NGramDraft | None = None,
) -> float:
    """Export, verify against PyTorch and atomically write ``path`` (fp32, with metadata).

    ``graph`` is the module traced into ONNX, by default ``CachedGPT(model)``; the
    parity reference is always ``model``'s own uncached forward. Raises ExportError
    (nothing written) when the tokenizer does not fit the model, when the graph is
    not one flat valid graph or when its logits differ from PyTorch's by more than
    ``atol``. Returns the largest difference seen.
    """
    if tokenizer.size != model.cfg.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.size} tokens but the model expects {model.cfg.vocab_size}; "
            "re-run encode and train so the checkpoint and the encoded data match"
        )
    # Export a float32 CPU copy in eval mode; the caller's model is left untouched.
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    if graph is None:
        graph = CachedGPT(model)
    proto = to_onnx(graph.to(device="cpu", dtype=torch.float32), opset)
    set_metadata(proto, metadata(model, tokenizer, metrics, "fp32", origin, draft))
    check_structure(proto)
    data = proto.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the stage's output is its own
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    err = max_parity_error(model, session)
    if not err <= atol:  # also catches NaN
        raise ExportError(
            f"ONNX Runtime logits differ from PyTorch by {err:.3g} (allowed {atol:g}); "
            "the exported graph is wrong, no model was written"
        )
    write_bytes(path, data)
    return err


def export_checkpoint(
    checkpoint: str | Path,
    encoded_dir: str | Path,
    metrics_path: str | Path,
    out: str | Path,
    opset: int = contract.OPSET,
    atol: float = 1e-4,
    draft_context: int = 0,
    draft_bits: int = 15,
    draft_min_count: int = 1,
) -> dict[str, Any]:
    """The export stage: checkpoint + evaluation metrics (+ the training split's draft
    table unless ``draft_context`` is 0) -> verified fp32 ONNX file.

    Returns a summary (``path``, ``size_bytes``, ``max_abs_diff``, ``num_params``).
    """
    from pipeline.tokens.splits import read_tokenizer
    from pipeline.training.checkpoint import load_model

    model, tokenizer, info = load_model(checkpoint)
    if read_tokenizer(encoded_dir) != tokenizer:
        raise ExportError(
            f"{checkpoint} was trained with a different tokenizer than the one in {encoded_dir}; "
            "re-run the train stage (dvc repro train)"
        )
    evaluated = read_json_object(metrics_path, "evaluation metrics", "run the evaluate stage")
    draft = train_draft(encoded_dir, tokenizer.size, draft_context, draft_bits, draft_min_count)
    err = export_onnx(model, tokenizer, out, evaluated, opset=opset, atol=atol, origin=info.get("origin"),
                      draft=draft)
    return {
        "path": str(out),
        "size_bytes": Path(out).stat().st_size,
        "max_abs_diff": err,
        "num_params": model.num_params(),
    }

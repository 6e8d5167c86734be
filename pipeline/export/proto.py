"""Checks and edits of an ONNX model file that export and quantization share."""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from chargen.errors import ChargenError

# Ops that carry subgraphs; their bodies are invisible to quantize_dynamic.
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}


class ModelFileError(ChargenError):
    """An ONNX file is not the one flat, self-contained graph a chargen model must be."""


def check_structure(proto: onnx.ModelProto) -> None:
    """One flat graph, valid ONNX, weights embedded."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelFileError(f"exported graph is not valid ONNX ({str(e).splitlines()[0]})") from None
    nested = sorted({n.op_type for n in proto.graph.node if n.op_type in CONTROL_FLOW_OPS})
    if nested:
        raise ModelFileError(f"exported graph contains {', '.join(nested)} nodes; expected one flat graph")
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelFileError(f"exported graph stores weights in an external file ({external[0]})")


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace metadata entries with the same keys, keep the others."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        proto.metadata_props.add(key=key, value=value)

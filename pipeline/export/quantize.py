"""Quantization of the exported fp32 model: int8 (dynamic) and int4 (weight-only blocks).

int8: weights are stored as int8 once; activations are quantized on the fly per call
(``quantize_dynamic``), which needs no calibration data and suits a model whose
per-step cost is a handful of small MatMuls.  Pre-processing first (shape
inference + ONNX Runtime graph optimisation) is what the ONNX Runtime
documentation recommends: the quantizer then sees folded constants and known
shapes.

int4: ONNX Runtime's weight-only block quantizer.  Every weight MatMul becomes a
``com.microsoft`` ``MatMulNBits`` node and every table lookup (the embedding and the
n-gram tables) a ``GatherBlockQuantized`` node, holding 4-bit weights in blocks of
``int4_block_size`` values with one fp32 scale per block; activations stay fp32.

Both carry the ``chargen.*`` metadata over with their precision.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from chargen import contract
from chargen.errors import ChargenError
from pipeline.export.proto import check_structure, set_metadata
from pipeline.files import write_bytes
from pipeline.params import QuantizeParams


class QuantizeError(ChargenError):
    """The fp32 model cannot be quantized, or the result is not what was asked for."""


def float_weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of MatMul/Gemm nodes whose weight is still a float initializer."""
    floats = {
        t.name for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    }
    return [
        n.name for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm") and any(i in floats for i in n.input)
    ]


def read_fp32(src: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The chargen fp32 model at ``src`` and its metadata; QuantizeError otherwise."""
    try:
        source = onnx.load(str(src))
    except FileNotFoundError:
        raise QuantizeError(f"{src}: not found; run the export stage first") from None
    except Exception as e:  # protobuf raises its own DecodeError types
        raise QuantizeError(f"{src}: not a readable ONNX file ({e}); re-run the export stage") from None
    props = {p.key: p.value for p in source.metadata_props}
    if props.get(contract.META_PRECISION) != "fp32":
        raise QuantizeError(f"{src}: not a chargen fp32 model (re-run the export stage)")
    return source, props


def write_quantized(proto: onnx.ModelProto, props: dict[str, str], precision: str, dst: str | Path) -> None:
    """Check that no weight MatMul was left in fp32, stamp the metadata and write ``dst``."""
    set_metadata(proto, {**props, contract.META_PRECISION: precision})
    proto.producer_name = "chargen"
    check_structure(proto)
    left = float_weight_matmuls(proto)
    if left:
        raise QuantizeError(
            f"{len(left)} weight MatMul(s) were left in fp32 (first: {left[0]}); "
            "the exported graph is not what the quantizer expects, re-run the export stage"
        )
    write_bytes(dst, proto.SerializeToString())


def quantize_int8(src: str | Path, dst: str | Path, q: QuantizeParams) -> None:
    """Write ``dst``: the int8 dynamic quantization of the chargen fp32 model ``src``.

    ``q.op_types``: ONNX op types whose weights become int8 (MatMul at least; Gather
    also quantizes the embedding and the n-gram tables). ``q.per_channel``: one scale
    per output column instead of per tensor. ``q.reduce_range``: 7-bit weights, which
    avoid int16 saturation in the u8 x s8 kernels of CPUs without VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(src)
    _, props = read_fp32(src)
    # The quantizer logs every node it skips; keep the stage's output readable.
    logging.getLogger("root").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="chargen-quantize-") as tmp:
        pre, out = Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        # ONNX's own shape inference, not ORT's symbolic one: the latter mistakes the
        # standard opset-23 Attention node for ORT's contrib Attention and fails on it.
        quant_pre_process(str(src), pre, skip_optimization=False, skip_symbolic_shape=True)
        quantize_dynamic(
            pre,
            out,
            op_types_to_quantize=list(q.op_types),
            per_channel=q.per_channel,
            reduce_range=q.reduce_range,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load(str(out))
    write_quantized(proto, props, "int8", dst)


def quantize_int4(src: str | Path, dst: str | Path, q: QuantizeParams) -> None:
    """Write ``dst``: the 4-bit weight-only block quantization of the chargen fp32 model ``src``.

    ``q.op_types`` as for int8 (Gather: the tables too); ``q.int4_block_size``: values per
    block, each block with one fp32 scale (symmetric: no zero point). ``accuracy_level``
    4 lets ONNX Runtime multiply in int8 on the fly, the fastest path on x86.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    source, props = read_fp32(Path(src))
    logging.getLogger("root").setLevel(logging.WARNING)  # the quantizer logs every node
    quantizer = MatMulNBitsQuantizer(
        source, bits=4, block_size=q.int4_block_size, is_symmetric=True, accuracy_level=4,
        op_types_to_quantize=tuple(q.op_types),
    )
    # Table rows never trained stay zero: their blocks get scale 0, which the quantizer
    # maps to 0 after a division it warns about.
    with np.errstate(invalid="ignore", divide="ignore"):
        quantizer.process()
    write_quantized(quantizer.model.model, props, "int4", dst)

"""What a chargen model file is: the one contract between the pipeline that writes it and
the runtime that reads it.

Everything here is defined once: the export stage imports it to write a file, the
runtime to read one, and nothing restates it. The graph's inputs and outputs are named
as in the ONNX decoders that Hugging Face Optimum exports, so other tools recognise it:

    input_ids                      int64   (batch, seq)      new token ids
    position_ids                   int64   (batch, seq)      their absolute positions
    attn_mask                      bool    (seq, past + seq) True where new token i may
                                                             attend to cache entry j
    prev_ids                       int64   (batch, n)        the n ids before input_ids[:, 0]
                                                             (models with n-gram tables only)
    past_key_values.{i}.key/value  float32 (batch, n_head, past, head_size), past may be 0
 -> logits                         float32 (batch, seq, vocab)
    present.{i}.key/value          float32 (batch, n_head, past + seq, head_size)

Metadata (``metadata_props``, all strings) makes the file self-contained: the tokenizer,
the model's shape and the metrics it was exported with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Bump on any change to the names, the metadata or their meaning: a file of another
# format is refused with a hint to re-export it.
FORMAT_VERSION = "3"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
# The attention mask is an input, not built inside the graph, so one graph serves every
# layout of the cache: chronological (a causal mask), a ring whose slots are reused once
# the window is full, and several new tokens whose windows each start one entry later.
ATTN_MASK = "attn_mask"
# The ids just before the new ones, which a model with n-gram embeddings reads: a graph
# has this input only when it needs it, and its second dimension says how many ids. The
# id vocab_size stands for "no token" (before the start of the text).
PREV_IDS = "prev_ids"
LOGITS = "logits"

# metadata_props keys
META_FORMAT = "chargen.format"  # FORMAT_VERSION
META_TOKENIZER = "chargen.tokenizer"  # JSON: the tokenizer description (chargen.tokenizers)
META_CONFIG = "chargen.config"  # JSON: the model's shape (CONFIG_KEYS and more) and num_params
META_METRICS = "chargen.metrics"  # JSON object: quality metrics known at export time
META_PRECISION = "chargen.precision"  # one of PRECISIONS
META_ORIGIN = "chargen.origin"  # JSON object: where the weights came from (optional)
META_DRAFT = "chargen.draft"  # JSON object: the n-gram draft table (chargen.draft; optional)
REQUIRED_METADATA = (META_FORMAT, META_TOKENIZER, META_CONFIG, META_PRECISION)

# Keys of the config object that a reader relies on.
CONFIG_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pos_encoding", "num_params")
POS_ENCODINGS = ("rope", "learned")

# The precisions the pipeline produces, full precision first; the runtime's default.
# int8: dynamic quantization (standard ONNX ops); int4: weight-only 4-bit blocks
# (ONNX Runtime's com.microsoft MatMulNBits and GatherBlockQuantized ops).
PRECISIONS = ("fp32", "int8", "int4")
DEFAULT_PRECISION = "int8"

# Where `dvc repro` leaves the models and where the CLI looks for them by default.
MODEL_DIR = Path("models")


def causal_mask(seq: int, past: int) -> np.ndarray:
    """``attn_mask`` for a chronological cache: new token i sees entries 0..past + i, (seq, past + seq)."""
    return np.tri(seq, past + seq, past, dtype=bool)


def past_names(n_layer: int) -> list[str]:
    """``past_key_values.{i}.key`` and ``.value`` for every layer, in input order."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """``present.{i}.key`` and ``.value`` for every layer, in output order."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def input_names(n_layer: int, prev_ids: bool = False) -> list[str]:
    return [INPUT_IDS, POSITION_IDS, ATTN_MASK, *([PREV_IDS] if prev_ids else []), *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]


def model_path(precision: str, model_dir: str | Path = MODEL_DIR) -> Path:
    """``models/model.<precision>.onnx``: the file of one precision."""
    return Path(model_dir) / f"model.{precision}.onnx"

"""What a chargen model file is: the one contract between the pipeline that writes it and
the runtime that reads it.

Everything here is defined once: the export stage imports it to write a file, the
runtime to read one, and nothing restates it. The graph's inputs and outputs are named
as in the ONNX decoders that Hugging Face Optimum exports; the cache is laid out as below:

    input_ids                      int64   (batch, seq)      new token ids
    position_ids                   int64   (batch, seq)      their absolute positions
    attn_mask                      bool    (seq, slots)      True where new token i may
                                                             attend to cache slot j
    cache_index                    int64   (batch,)          the slot of input_ids[:, 0]'s
                                                             key/value; new token t goes
                                                             to slot (cache_index + t) % slots
    prev_ids                       int64   (batch, n)        the n ids before input_ids[:, 0]
                                                             (models with n-gram tables only)
    past_key_values.{i}.key/value  float32 (batch, n_head, slots, head_size)  the cache
 -> logits                         float32 (batch, seq, vocab)
    present.{i}.key/value          float32 (batch, n_head, slots, head_size)  the cache with
                                                             the new tokens' keys/values written in

The cache has a fixed number of slots, and the graph writes the new entries into it with
the standard ``TensorScatter`` op (opset 24) before attending over every slot under the
mask. Bound to the same buffer as its ``past`` input (an ONNX Runtime ``IOBinding``), a
``present`` output is that buffer updated in place: a step moves only its new entries,
never the whole cache.

Metadata (``metadata_props``, all strings) makes the file self-contained: the tokenizer,
the model's shape and the metrics it was exported with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Bump on any change to the names, the metadata or their meaning: a file of another
# format is refused with a hint to re-export it.
FORMAT_VERSION = "4"
# The lowest ONNX opset of a model file: RotaryEmbedding and Attention are standard ops
# from opset 23; TensorScatter, which writes new keys/values into a fixed-size cache in
# place, from 24.
OPSET = 24
# The lowest sampling temperature, in the CLI and in params.yaml: far lower, dividing the
# logits by it overflows float64 (1e-320 does); at this one, logits 1e-4 apart are
# already weighted e^100 to 1: the draw is the most likely token.
MIN_TEMPERATURE = 1e-6

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
# The attention mask is an input, not built inside the graph, so one graph serves every
# layout of the cache: chronological (a causal mask), a ring whose slots are reused once
# the window is full, and several new tokens whose windows each start one entry later.
ATTN_MASK = "attn_mask"
# Where the new tokens' keys and values go in the cache (a ring once the window is full).
CACHE_INDEX = "cache_index"
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


def causal_mask(seq: int, past: int, slots: int | None = None) -> np.ndarray:
    """``attn_mask`` for a chronological cache whose slots 0..past - 1 hold the tokens
    before: new token i sees slots 0..past + i, (seq, slots); slots defaults to past + seq."""
    import numpy as np  # here, not at the top: the command line reads this module before it needs numpy

    return np.tri(seq, past + seq if slots is None else slots, past, dtype=bool)


def past_names(n_layer: int) -> list[str]:
    """``past_key_values.{i}.key`` and ``.value`` for every layer, in input order."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """``present.{i}.key`` and ``.value`` for every layer, in output order."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def input_names(n_layer: int, prev_ids: bool = False) -> list[str]:
    return [INPUT_IDS, POSITION_IDS, ATTN_MASK, CACHE_INDEX, *([PREV_IDS] if prev_ids else []),
            *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]


def model_path(precision: str, model_dir: str | Path = MODEL_DIR) -> Path:
    """``models/model.<precision>.onnx``: the file of one precision."""
    return Path(model_dir) / f"model.{precision}.onnx"

"""One-token decoding steps of a rotary model whose full window stays where ONNX Runtime
reads it, instead of passing through numpy every step.

``session.run`` turns every output into a fresh numpy array, and a sliding window then
copies the new entries into the runtime's ring layer by layer: at one character per
call, moving the cache that way costs more than drawing the character. Once the window
is full, the session is driven through an ``IOBinding`` instead: the cache is a ring of
W - 1 entries per layer in one numpy buffer that the session reads in place, the outputs
land in buffers allocated once, and a step moves only the new token's keys and values.
While the cache still grows (the first W - 1 tokens) its shape changes every step, and
plain ``ChargenModel.forward`` calls are the faster way. The arithmetic is the same
graph's either way, so the logits are the same to the bit. Shapes: B samples, H heads,
D head size, V vocabulary, W context length, L2 = 2 * layers (a key and a value per layer).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from chargen import contract
from chargen.model import ChargenModel


class RopeDecoder:
    """Feeds one new token per sample and returns the next logits, the window sliding.

    A single new query sees every cached key (the causal mask is all true) and rotary
    keys carry their own positions, so attention does not depend on the order of the
    cached entries: once the window is full the oldest entry is overwritten in place.
    """

    def __init__(self, model: ChargenModel, present: list[np.ndarray], pos: int, prev: np.ndarray | None) -> None:
        """``present``: the prompt's keys/values (B, H, P, D) each; ``pos``: the position of
        the next token; ``prev`` (B, n): the n ids before it, for a graph that reads them."""
        self.model = model
        self.keep = model.block_size - 1
        B = present[0].shape[0]
        # Inputs that change every step are numpy buffers updated in place.
        self._ids = np.empty((B, 1), dtype=np.int64)
        self._pos = np.full((B, 1), pos, dtype=np.int64)
        self._prev = None if prev is None else np.ascontiguousarray(prev, dtype=np.int64)  # (B, n)
        self._past = present
        self._ring: np.ndarray | None = None
        self._oldest = 0
        if present[0].shape[2] > self.keep:
            self._start_ring(present)

    def _start_ring(self, present: list[np.ndarray]) -> None:
        """The window is full: from now on the cache is a ring of its last W - 1 entries,
        bound once with every other input and output of a step."""
        B, H, _, D = present[0].shape
        self._ring = np.stack([p[:, :, -self.keep :] for p in present])  # (L2, B, H, W-1, D)
        self._present = np.empty((len(present), B, H, self.keep + 1, D), dtype=np.float32)  # (L2, B, H, W, D)
        self._logits = np.empty((B, 1, self.model.vocab_size), dtype=np.float32)  # (B, 1, V)
        self._io = self.model.session.io_binding()
        n_layer = self.model.config.n_layer
        inputs = {contract.INPUT_IDS: self._ids, contract.POSITION_IDS: self._pos,
                  **dict(zip(contract.past_names(n_layer), self._ring, strict=True))}
        if self._prev is not None:
            inputs[contract.PREV_IDS] = self._prev
        for name, array in inputs.items():
            self._io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))  # shares the memory
        outputs = {contract.LOGITS: self._logits, **dict(zip(contract.present_names(n_layer), self._present,
                                                             strict=True))}
        for name, array in outputs.items():
            self._io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed the new ids (B,) -> the next logits (B, V), valid until the next step."""
        self._ids[:, 0] = ids
        if self._ring is None:
            logits, present = self.model.forward(self._ids, self._pos, self._past, self._prev)  # (B, 1, V)
        else:
            self.model.session.run_with_iobinding(self._io)
            logits = self._logits
        self._pos += 1
        if self._prev is not None:
            self._prev[:, :-1] = self._prev[:, 1:]  # (B, n): shift in the id just fed
            self._prev[:, -1] = ids
        if self._ring is not None:
            self._ring[:, :, :, self._oldest] = self._present[:, :, :, -1]  # (L2, B, H, D): the new entries
            self._oldest = (self._oldest + 1) % self.keep
        elif present[0].shape[2] > self.keep:
            self._start_ring(present)
        else:
            self._past = present
        return logits[:, -1, :]

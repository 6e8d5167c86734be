"""Decoding steps of a rotary model: new tokens in, next-token logits out, the window
sliding, with the full window kept where ONNX Runtime reads it.

``session.run`` turns every output into a fresh numpy array, and a sliding window then
copies the new entries into the runtime's ring layer by layer: at one character per
call, moving the cache that way costs more than drawing the character. Once the window
is full, the session is driven through an ``IOBinding`` instead: the cache is a ring of
W - 1 entries per layer in one numpy buffer that the session reads in place, the outputs
land in buffers allocated once, and a step moves only the new tokens' keys and values.
While the cache still grows (the first W - 1 tokens) its shape changes every step, and
plain ``ChargenModel.forward`` calls are the faster way. The arithmetic is the same
graph's either way. Shapes: B samples, H heads, D head size, V vocabulary, W context
length, C = W - 1 cached entries, T new tokens, L2 = 2 * layers (a key and a value each).

Several tokens can be fed at once and only some of them kept (:meth:`RopeDecoder.feed`,
:meth:`RopeDecoder.keep`), which is what checking a drafted continuation needs. Each new
token sees exactly the W - 1 cached entries before it, as if fed alone: the graph's
attention mask is built from the positions of the cached entries, so a ring slot that a
later new token's window has left is hidden from that token only.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from chargen import contract
from chargen.model import ChargenModel


def window_mask(key_pos: np.ndarray, query_pos: np.ndarray, window: int) -> np.ndarray:
    """(T, S) bool: query i sees key j when key_pos[j] is among its last ``window`` positions.

    key_pos (S,): the position of every cache entry, the new tokens' last; query_pos (T,).
    """
    q = query_pos[:, None]  # (T, 1)
    return (key_pos[None, :] <= q) & (key_pos[None, :] > q - window)  # (T, S)


class _Binding:
    """Every input and output of a ring step of T new tokens, bound once: the ring arrays
    (shared by every binding), and per-T buffers that are updated in place."""

    def __init__(self, model: ChargenModel, ring: np.ndarray, prev: np.ndarray | None, T: int) -> None:
        L2, B, H, C, D = ring.shape
        self.ids = np.empty((B, T), dtype=np.int64)
        self.pos = np.empty((B, T), dtype=np.int64)
        self.mask = np.ones((T, C + T), dtype=bool)  # one new token sees the whole ring
        self.present = np.empty((L2, B, H, C + T, D), dtype=np.float32)
        self.logits = np.empty((B, T, model.vocab_size), dtype=np.float32)
        self.io = model.session.io_binding()
        n_layer = model.config.n_layer
        inputs = {contract.INPUT_IDS: self.ids, contract.POSITION_IDS: self.pos, contract.ATTN_MASK: self.mask,
                  **dict(zip(contract.past_names(n_layer), ring, strict=True))}
        if prev is not None:
            inputs[contract.PREV_IDS] = prev
        for name, array in inputs.items():
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))  # shares the memory
        outputs = {contract.LOGITS: self.logits,
                   **dict(zip(contract.present_names(n_layer), self.present, strict=True))}
        for name, array in outputs.items():
            self.io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))


class RopeDecoder:
    """Feeds new tokens and returns the next logits, the window sliding.

    A new query sees the cached keys under a mask, and rotary keys carry their own
    positions, so attention does not depend on the order of the cached entries: once
    the window is full the oldest entry is overwritten in place.
    """

    def __init__(self, model: ChargenModel, present: list[np.ndarray], pos: int, prev: np.ndarray | None) -> None:
        """``present``: the prompt's keys/values (B, H, P, D) each; ``pos``: the position of
        the next token; ``prev`` (B, n): the n ids before it, for a graph that reads them."""
        self.model = model
        self.window = model.block_size
        self.keep_len = self.window - 1  # C
        self.pos = pos
        self._prev = None if prev is None else np.ascontiguousarray(prev, dtype=np.int64)  # (B, n)
        self._past = present
        self._ring: np.ndarray | None = None  # (L2, B, H, C, D) once the window is full
        self._oldest = 0  # the ring's slot of its oldest entry
        self._masks: dict[tuple[int, int], np.ndarray] = {}  # (T, oldest) -> ring mask
        self._bindings: dict[int, _Binding] = {}
        self._fed: tuple[np.ndarray, list[np.ndarray] | None, _Binding | None] | None = None
        if present[0].shape[2] > self.keep_len:
            self._start_ring(present)

    def _start_ring(self, present: list[np.ndarray]) -> None:
        """The window is full: from now on the cache is a ring of its last C entries."""
        C = self.keep_len
        # Slot (oldest + j) % C holds position pos - C + j: every kept token replaces the oldest.
        self._ring = np.stack([p[:, :, -C:] for p in present])  # (L2, B, H, C, D)
        self._oldest = 0
        self._one = self._binding(1)

    def _binding(self, T: int) -> _Binding:
        if T not in self._bindings:
            self._bindings[T] = _Binding(self.model, self._ring, self._prev, T)
        return self._bindings[T]

    def _ring_mask(self, T: int) -> np.ndarray:
        """(T, C + T) of ``window_mask`` for T new tokens after the ring as it stands: new
        token i does not see the i oldest entries. It depends only on T and the oldest slot."""
        key = (T, self._oldest)
        if key not in self._masks:
            C = self.keep_len
            slot_pos = (np.arange(C) - self._oldest) % C - C  # (C,) positions relative to the next token
            query_pos = np.arange(T)
            self._masks[key] = window_mask(np.concatenate([slot_pos, query_pos]), query_pos, self.window)
        return self._masks[key]

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed one new id per sample (B,) -> the next logits (B, V), valid until the next call."""
        if self._ring is None:
            logits = self.feed(ids[:, None])
            self.keep(1)
            return logits[:, -1, :]
        b = self._one  # the hot path: the mask stays all true, nothing but the ids changes
        b.ids[:, 0] = ids
        b.pos[:] = self.pos
        self.model.session.run_with_iobinding(b.io)
        slot = self._oldest
        self._ring[:, :, :, slot] = b.present[:, :, :, -1]  # (L2, B, H, D): the new entries
        self._oldest = (slot + 1) % self.keep_len
        self.pos += 1
        if self._prev is not None:
            self._prev[:, :-1] = self._prev[:, 1:]  # (B, n): shift in the id just fed
            self._prev[:, -1] = ids
        return b.logits[:, -1, :]

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Feed new ids (B, T) -> logits (B, T, V): row t predicts the token after ids[:, t].
        Nothing is cached until :meth:`keep` says how many of them to keep."""
        ids = np.asarray(ids, dtype=np.int64)  # the graph's input type, whatever the platform's default int
        T = ids.shape[1]
        query_pos = np.arange(self.pos, self.pos + T, dtype=np.int64)  # (T,)
        if self._ring is None:
            P = self._past[0].shape[2]
            key_pos = np.arange(self.pos - P, self.pos + T, dtype=np.int64)  # chronological, (P + T,)
            positions = np.broadcast_to(query_pos, ids.shape).copy()  # (B, T)
            logits, present = self.model.forward(ids, positions, self._past, self._prev,
                                                 window_mask(key_pos, query_pos, self.window))
            self._fed = (ids, present, None)
            return logits
        b = self._binding(T)
        b.ids[:] = ids
        b.pos[:] = query_pos  # (B, T)
        if T > 1:
            np.copyto(b.mask, self._ring_mask(T))
        self.model.session.run_with_iobinding(b.io)
        self._fed = (ids, None, b)
        return b.logits

    def keep(self, m: int) -> None:
        """Cache the first ``m`` ids of the last :meth:`feed` (1 <= m <= T); drop the rest."""
        ids, present, b = self._fed
        if b is None:
            P = self._past[0].shape[2]
            kept = [np.ascontiguousarray(p[:, :, : P + m]) for p in present]  # (B, H, P + m, D) each
            self.pos += m
            if P + m > self.keep_len:
                self._start_ring(kept)
            else:
                self._past = kept
        else:
            C, first = self.keep_len, self._oldest  # the m oldest entries make way
            if first + m <= C:
                self._ring[:, :, :, first : first + m] = b.present[:, :, :, C : C + m]  # (L2, B, H, m, D)
            else:
                for j in range(m):
                    self._ring[:, :, :, (first + j) % C] = b.present[:, :, :, C + j]  # (L2, B, H, D)
            self._oldest = (first + m) % C
            self.pos += m
        if self._prev is not None:
            self._shift_prev(ids[:, :m])
        self._fed = None

    def _shift_prev(self, ids: np.ndarray) -> None:
        """prev (B, n) becomes the n ids before the next new one, in place: ids (B, m) were kept."""
        n, m = self._prev.shape[1], ids.shape[1]
        if m >= n:
            self._prev[:] = ids[:, m - n :]
        else:
            self._prev[:, : n - m] = self._prev[:, m:]
            self._prev[:, n - m :] = ids

"""Decoding steps of a rotary model: new tokens in, next-token logits out, the window
sliding, with the cache kept where ONNX Runtime reads and writes it.

The cache is a ring of R slots per layer in numpy buffers allocated once. The session is
driven through an ``IOBinding`` that binds each buffer as both the layer's past and its
present, so the graph writes the new tokens' keys and values into their slots in place
and a step moves nothing else: no copy of the cache, in or out. Rotary keys carry their
own positions, so attention does not depend on the order of the slots; the graph's
attention mask, built from the age of every slot, hides the slots outside each new
token's window and those not written yet.

Several tokens can be fed at once and only some of them kept (:meth:`RopeDecoder.feed`,
:meth:`RopeDecoder.keep`), which is what checking a drafted continuation needs. Each new
token sees exactly the W - 1 cached entries before it, as if fed alone: with up to F
tokens per call the ring has R = W - 1 + F slots, so writing a call's tokens never
overwrites an entry that one of them still sees. Shapes: B samples, H heads, D head
size, V vocabulary, W context length, T new tokens.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from chargen import contract
from chargen.model import ChargenModel, bind_cache

# Relative position of a slot not written yet: outside every window.
_EMPTY = np.iinfo(np.int64).min // 2


def window_mask(key_pos: np.ndarray, query_pos: np.ndarray, window: int) -> np.ndarray:
    """(T, S) bool: query i sees key j when key_pos[j] is among its last ``window`` positions.

    key_pos (S,): the position of every cache entry, the new tokens' included; query_pos (T,).
    """
    q = query_pos[:, None]  # (T, 1)
    return (key_pos[None, :] <= q) & (key_pos[None, :] > q - window)  # (T, S)


class _Binding:
    """Every input and output of a call of T new tokens, bound once: the ring (shared by
    every binding, past and present alike) and per-T buffers that are updated in place."""

    def __init__(self, model: ChargenModel, ring: list[np.ndarray], prev: np.ndarray | None, T: int) -> None:
        B, _, R, _ = ring[0].shape
        self.ids = np.empty((B, T), dtype=np.int64)
        self.pos = np.empty((B, T), dtype=np.int64)
        self.index = np.empty(B, dtype=np.int64)
        self.mask = np.ones((T, R), dtype=bool)
        self.held: np.ndarray | None = None  # the mask array whose values ``mask`` holds
        self.logits = np.empty((B, T, model.vocab_size), dtype=np.float32)
        self.io = model.session.io_binding()
        inputs = {contract.INPUT_IDS: self.ids, contract.POSITION_IDS: self.pos, contract.ATTN_MASK: self.mask,
                  contract.CACHE_INDEX: self.index}
        if prev is not None:
            inputs[contract.PREV_IDS] = prev
        for name, array in inputs.items():
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))  # shares the memory
        bind_cache(self.io, ring)
        self.io.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))


class RopeDecoder:
    """Feeds new tokens and returns the next logits, the window sliding.

    The next token's entries go to slot ``next``; the slot before it holds the newest
    cached entry, and so on round the ring. Once the ring has been filled, a new token
    overwrites the oldest entry, and the mask of T new tokens depends only on T and
    ``next``: each is made once, and equal masks are one array (with one token per call,
    every slot's mask is all true), so a binding copies a mask only when it changes.
    """

    def __init__(self, model: ChargenModel, cache: list[np.ndarray], pos: int, prev: np.ndarray | None,
                 max_feed: int = 1) -> None:
        """``cache``: the prompt's chronological keys/values (B, H, P, D) each; ``pos``: the
        position of the next token; ``prev`` (B, n): the n ids before it, for a graph that
        reads them; ``max_feed``: the most tokens one :meth:`feed` may take."""
        if max_feed < 1:
            raise ValueError(f"max_feed must be >= 1, got {max_feed}")
        self.model = model
        self.window = model.block_size
        self.max_feed = max_feed
        self.slots = self.window - 1 + max_feed  # R
        self.pos = pos
        self._prev = None if prev is None else np.ascontiguousarray(prev, dtype=np.int64)  # (B, n)
        B, H, P, D = cache[0].shape
        kept = min(P, self.window - 1)  # the entries the next token sees
        self._ring = [np.zeros((B, H, self.slots, D), dtype=np.float32) for _ in cache]  # (B, H, R, D) each
        for ring, entries in zip(self._ring, cache, strict=True):
            ring[:, :, :kept] = entries[:, :, P - kept :]
        self._next = kept  # R > W - 1 >= kept
        self._filled = kept  # slots written so far, at most R
        self._masks: dict[tuple[int, int], np.ndarray] = {}  # (T, next) -> mask, once the ring is full
        self._distinct: dict[tuple[int, bytes], np.ndarray] = {}  # one array per distinct mask
        self._bindings: dict[int, _Binding] = {}
        self._fed: tuple[np.ndarray, int] | None = None

    @property
    def prev(self) -> np.ndarray | None:
        """The n ids before the next new token (B, n), for a graph that reads them; else None."""
        return self._prev

    def _binding(self, T: int) -> _Binding:
        if T not in self._bindings:
            self._bindings[T] = _Binding(self.model, self._ring, self._prev, T)
        return self._bindings[T]

    def _mask(self, T: int) -> np.ndarray:
        """(T, R) ``window_mask`` of T new tokens written from slot ``next``, by the slots' ages."""
        key = (T, self._next)
        full = self._filled >= self.slots
        if full and key in self._masks:
            return self._masks[key]
        R = self.slots
        age = (self._next - 1 - np.arange(R)) % R  # (R,): 0 for the newest cached entry
        key_pos = np.where(age < self._filled, -1 - age, _EMPTY)  # positions relative to the next token
        query_pos = np.arange(T)
        key_pos[(self._next + query_pos) % R] = query_pos  # the new tokens replace the oldest slots
        mask = window_mask(key_pos, query_pos, self.window)
        if full:
            mask = self._masks[key] = self._distinct.setdefault((T, mask.tobytes()), mask)
        return mask

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed one new id per sample (B,) -> the next logits (B, V), valid until the next call.

        :meth:`feed` and :meth:`keep` of one token without their checks: the hot path of
        batches and of one stream without a draft table."""
        b = self._binding(1)
        b.ids[:, 0] = ids
        b.pos.fill(self.pos)
        self._run(b, 1)
        self._advance(b.ids)
        return b.logits[:, 0, :]

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Feed new ids (B, T), T <= max_feed -> logits (B, T, V), valid until the next call:
        row t predicts the token after ids[:, t]. Nothing counts as cached until
        :meth:`keep` says how many of them to keep."""
        T = ids.shape[1]
        if T > self.max_feed:
            raise ValueError(f"this decoder takes at most {self.max_feed} tokens per call, got {T}")
        b = self._binding(T)
        b.ids[:] = ids
        b.pos[:] = np.arange(self.pos, self.pos + T)  # (B, T)
        self._run(b, T)
        self._fed = (b.ids, T)
        return b.logits

    def keep(self, m: int) -> None:
        """Cache the first ``m`` ids of the last :meth:`feed` (1 <= m <= T); drop the rest.

        The dropped tokens' entries stay in their slots, as old as the oldest entries: the
        next call's mask hides them, and its tokens overwrite them."""
        ids, T = self._fed
        if not 1 <= m <= T:
            raise ValueError(f"keep takes 1..{T} of the tokens fed, got {m}")
        self._advance(ids[:, :m])
        self._fed = None

    def _run(self, b: _Binding, T: int) -> None:
        """One session call of T new tokens from slot ``next``, ids and positions already in ``b``."""
        b.index.fill(self._next)
        mask = self._mask(T)
        if b.held is not mask:  # the growth's masks are new arrays each call; the full ring's are kept
            np.copyto(b.mask, mask)
            b.held = mask
        self.model.session.run_with_iobinding(b.io)

    def _advance(self, ids: np.ndarray) -> None:
        """The ids (B, m) just fed are cached: the next token goes m slots on."""
        m = ids.shape[1]
        self._next = (self._next + m) % self.slots
        self._filled = min(self._filled + m, self.slots)
        self.pos += m
        if self._prev is not None:
            self._shift_prev(ids)

    def _shift_prev(self, ids: np.ndarray) -> None:
        """prev (B, n) becomes the n ids before the next new one, in place: ids (B, m) were kept."""
        n, m = self._prev.shape[1], ids.shape[1]
        if m >= n:
            self._prev[:] = ids[:, m - n :]
        else:
            self._prev[:, : n - m] = self._prev[:, m:]
            self._prev[:, n - m :] = ids

"""Learning byte-level BPE with Hugging Face ``tokenizers``, and the description the runtime's
``BPETokenizer`` encodes with.

The ``tokenizers`` configuration is the one ``BPETokenizer`` repeats exactly:

- no normalizer: line ends and NFC are the project's ``normalize_text`` (Python's
  ``unicodedata``) on both sides, never Rust tables of another Unicode version;
- pre-tokenizer: ``Split`` on :func:`split_pattern` (isolated), then ``ByteLevel`` without its
  own regex and without a prefix space, which only maps each byte to a stand-in character;
- model: ``BPE`` without unknown token, byte fallback, dropout, subword affixes or
  ``ignore_merges``, with all 256 bytes in the vocabulary (``initial_alphabet``), so any text
  encodes and no byte is dropped;
- the end-of-text token is a special token with id 0, and ``encode_special_tokens`` is on:
  its string in a text encodes as plain text, as in the runtime and as training counted it.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from chargen.tokenizers import EOT_TOKEN, BPETokenizer, storage_dtype

MIN_VOCAB_SIZE = 256 + 1 + 1  # every byte, the end-of-text token and at least one merge
# Text is carried to the next chunk until a safe cut; without one for this many characters
# it is cut anyway, so that memory stays bounded.
MAX_CARRY_CHARS = 1 << 20
# ASCII characters that mean nothing special in a character class of either engine
_PLAIN_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


# --------------------------------------------------------------------------- pattern


@functools.lru_cache(maxsize=1)
def split_pattern() -> str:
    """GPT-2's pre-tokenization expression with its Unicode classes written out.

    ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``, where
    letters include the combining marks (a decomposed accent stays in its word) and ``\\s`` is
    ``str.isspace``. Python's ``re`` has no ``\\p{..}``, and it and Oniguruma disagree on
    ``\\s``, ``\\w`` and ``\\d`` (U+001C-U+001F, combining marks, digits added in later Unicode
    versions); explicit ranges, taken from this Python's ``unicodedata`` and frozen into the
    description, mean the same to both engines.
    """
    letters = _char_class(lambda c: unicodedata.category(c)[0] in "LM")
    numbers = _char_class(lambda c: unicodedata.category(c)[0] == "N")
    spaces = _char_class(str.isspace)
    return (
        "'(?:s|t|re|ve|m|ll|d)"
        f"| ?[{letters}]+"
        f"| ?[{numbers}]+"
        f"| ?[^{spaces}{letters}{numbers}]+"
        f"|[{spaces}]+(?![^{spaces}])"
        f"|[{spaces}]+"
    )


def _char_class(member: Callable[[str], bool]) -> str:
    """The inside of a character class holding exactly the members among all code points
    but the surrogates."""
    return "".join(
        _class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"
        for a, b in _ranges(member)
    )


def _ranges(member: Callable[[str], bool]) -> Iterator[tuple[int, int]]:
    start = None
    for cp in range(0x110000):
        inside = not 0xD800 <= cp <= 0xDFFF and member(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            yield start, cp - 1
            start = None
    if start is not None:
        yield start, 0x10FFFF


def _class_char(cp: int) -> str:
    # Non-ASCII characters are written as themselves: no escape for code points above U+FFFF
    # is common to both engines, and none has a special meaning in a class. Other ASCII
    # characters than letters and digits are written \xHH, which both read as that character.
    c = chr(cp)
    return f"\\x{cp:02x}" if cp < 0x80 and c not in _PLAIN_ASCII else c


def safe_cut(text: str, end: int) -> int | None:
    """The last position <= ``end`` where ``text`` may be cut so that encoding both parts
    equals encoding the whole (for reading a corpus in chunks), or None.

    Before a space that follows a printable ASCII character: no match of the pattern runs
    from a non-space across a space, and the whitespace lookahead only looks past spaces.
    """
    i = text.rfind(" ", 1, end + 1)
    while i > 0 and not "!" <= text[i - 1] <= "~":
        i = text.rfind(" ", 1, i)
    return i if i > 0 else None


def safe_chunks(
    pieces: Iterable[tuple[int, str]], max_carry: int = MAX_CARRY_CHARS
) -> Iterator[tuple[int, str]]:
    """A document's ``(split index, text)`` pieces re-cut so that each chunk ends at a
    :func:`safe_cut`: encoding the chunks one by one equals encoding each split's text
    whole. Text without a safe cut for ``max_carry`` characters (an unspaced script) is
    cut anyway, the one place where reading in chunks can change a merge."""
    split, carry = -1, ""
    for k, text in pieces:
        if k != split:
            if carry:
                yield split, carry
            split, carry = k, ""
        buf = carry + text
        cut = safe_cut(buf, len(buf))
        if cut is None and len(buf) > max_carry:
            cut = len(buf)
        if cut is None:
            carry = buf
            continue
        yield k, buf[:cut]
        carry = buf[cut:]
    if carry:
        yield split, carry


# --------------------------------------------------------------------------- training


def new_tokenizer(pattern: str | None) -> Tokenizer:
    """An untrained ``tokenizers`` BPE tokenizer in the configuration ``BPETokenizer``
    repeats (``pattern`` None: the whole text is one piece)."""
    tokenizer = Tokenizer(
        models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False, ignore_merges=False)
    )
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = [] if pattern is None else [pre_tokenizers.Split(Regex(pattern), behavior="isolated")]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*split, to_bytes])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Learn merges from ``texts`` (already normalised) with ``tokenizers``.

    Deterministic: the trainer ranks pairs by count, then by ids, and ids come from sorted
    alphabets, so the same texts give the same merges whatever the thread count. The
    vocabulary ends smaller than ``vocab_size`` when no pair is seen ``min_frequency`` times.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"BPE vocabulary size {vocab_size} is below {MIN_VOCAB_SIZE}")
    storage_dtype(vocab_size)
    tokenizer = new_tokenizer(split_pattern())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,  # a pair seen once teaches nothing
        special_tokens=[AddedToken(EOT_TOKEN, special=True)],  # first, so its id is 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def train(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, normalize_nfc: bool = True
) -> BPETokenizer:
    """BPE learned from ``texts``, which the caller has normalised with
    ``normalize_text(text, normalize_nfc)``, as the tokenizer will normalise its input."""
    return from_tokenizers(train_tokenizer(texts, vocab_size, min_frequency=min_frequency), normalize_nfc)


def from_tokenizers(tokenizer: Tokenizer, normalize_nfc: bool) -> BPETokenizer:
    """The runtime tokenizer of one made by :func:`new_tokenizer` (ids unchanged)."""
    config = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = config["model"]["vocab"]
    to_byte = byte_of_char()
    tokens: list[bytes | None] = [None] * len(vocab)
    for text, i in vocab.items():
        if text != EOT_TOKEN:
            tokens[i] = bytes(to_byte[c] for c in text)
    # merges are [left, right] lists (versions before 0.20 wrote "left right" strings)
    merges = [m.split(" ") if isinstance(m, str) else m for m in config["model"]["merges"]]
    steps = config["pre_tokenizer"]["pretokenizers"]
    return BPETokenizer(
        tokens,
        [(vocab[a], vocab[b]) for a, b in merges],
        steps[0]["pattern"]["Regex"] if steps[0]["type"] == "Split" else None,
        eot_id=vocab[EOT_TOKEN],
        normalize_nfc=normalize_nfc,
    )


def byte_of_char() -> dict[str, int]:
    """``ByteLevel``'s stand-in character -> byte: GPT-2's table, where printable Latin-1 bytes
    stand for themselves and the others, in byte order, for U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + n): b for n, b in enumerate(others)}

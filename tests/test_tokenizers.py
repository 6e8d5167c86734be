"""Tokenizers: the character table's and the byte tokenizer's round trips, unknown
characters, descriptions, dtypes, characters per token, and streaming decode (byte-level
BPE has its own tests/test_bpe.py)."""

from __future__ import annotations

import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargen.tokenizers import (
    EOT_TOKEN,
    UNK_TOKEN,
    ByteTokenizer,
    CharTokenizer,
    StreamDecoder,
    TokenizerError,
    from_description,
    normalize_text,
)

# Any character a str can hold except lone surrogates, which no UTF-8 corpus contains.
chars = st.characters(exclude_categories=("Cs",))


def vocab_of(text: str, **kwargs) -> CharTokenizer:
    counts = np.zeros(0x110000, dtype=np.int64)
    for ch in text:
        counts[ord(ch)] += 1
    return CharTokenizer.from_char_counts(counts, **kwargs)


@settings(max_examples=200, deadline=None)
@given(alphabet=st.sets(chars.filter(lambda c: c != "\r"), min_size=1, max_size=40), data=st.data())
def test_decode_inverts_encode_over_the_vocabulary(alphabet, data):
    vocab = vocab_of("".join(alphabet), normalize_nfc=False)
    text = data.draw(st.text(alphabet=sorted(alphabet), max_size=200))
    ids = vocab.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text)
    assert vocab.unk_id not in ids
    assert vocab.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(chars, max_size=100))
def test_nfc_vocab_round_trips_the_normalized_text(text):
    nfc = normalize_text(text, nfc=True)
    assert nfc == unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    vocab = vocab_of(nfc, normalize_nfc=True)
    assert vocab.unknown_chars(text) == []
    assert vocab.decode(vocab.encode(text)) == nfc


@settings(max_examples=200, deadline=None)
@given(known=st.text(chars, min_size=1, max_size=30), text=st.text(chars, max_size=100).map(
    lambda t: normalize_text(t, nfc=False)))
def test_unknown_characters_map_to_the_unknown_token(known, text):
    vocab = vocab_of(known, normalize_nfc=False)
    ids = vocab.encode(text)
    for ch, i in zip(text, ids.tolist(), strict=True):
        if ch in known:
            assert vocab.tokens[i] == ch
        else:
            assert i == vocab.unk_id
    expected = list(dict.fromkeys(ch for ch in text if ch not in known))
    assert vocab.unknown_chars(text) == expected


def test_layout_specials_first_then_code_point_order():
    vocab = vocab_of("banana\n")
    assert vocab.tokens == [EOT_TOKEN, UNK_TOKEN, "\n", "a", "b", "n"]
    assert (vocab.eot_id, vocab.unk_id, vocab.size) == (0, 1, 6)


def test_min_char_count_sends_rare_characters_to_unknown():
    vocab = vocab_of("aaabbc", min_char_count=2)
    assert vocab.tokens[2:] == ["a", "b"]
    assert vocab.encode("abc").tolist() == [2, 3, vocab.unk_id]
    assert vocab.unknown_chars("cab") == ["c"]


def test_decode_specials():
    vocab = vocab_of("ab")
    ids = [2, vocab.eot_id, 3, vocab.unk_id, 2]
    assert vocab.decode(ids) == "ab\ufffda"
    assert vocab.decode(ids, eot="|") == "a|b\ufffda"
    assert vocab.decode([]) == ""
    with pytest.raises(TokenizerError, match="out of range"):
        vocab.decode([2, 4])
    with pytest.raises(TokenizerError, match="out of range"):
        vocab.decode([-1])


def test_stream_decoding_equals_decoding_the_whole():
    vocab = vocab_of("héllo wörld")
    ids = vocab.encode("wörld héllo").tolist()
    stream = vocab.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == vocab.decode(ids)
    assert vocab.stream().push(vocab.eot_id) == ""


def test_generic_stream_holds_back_an_incomplete_character():
    """A token may end inside a multi-byte character: nothing is printed until it completes."""
    euro = "\u20ac".encode()  # 3 bytes
    stream = StreamDecoder([b"a", euro[:1], euro[1:2], euro[2:]])
    assert [stream.push(i) for i in (0, 1, 2, 3, 0)] == ["a", "", "", "\u20ac", "a"]
    assert stream.push(1) == "" and stream.flush() == "\ufffd"  # never completed


def test_nfc_applied_in_encode_only_when_the_vocab_says_so():
    decomposed = "e\u0301"
    nfc = vocab_of("\u00e9e\u0301", normalize_nfc=True)
    assert nfc.encode(decomposed).tolist() == nfc.encode("\u00e9").tolist()
    assert len(nfc.encode(decomposed)) == 1
    raw = vocab_of("\u00e9e\u0301", normalize_nfc=False)
    assert raw.decode(raw.encode(decomposed)) == decomposed


def test_description_round_trip_and_equality():
    vocab = vocab_of("hello, world\n", normalize_nfc=False)
    d = vocab.describe()
    assert d == {"kind": "char", "tokens": vocab.tokens, "eot_id": 0, "unk_id": 1, "normalize_nfc": False}
    again = from_description(d)
    assert isinstance(again, CharTokenizer) and again == vocab
    assert again.encode("low").tolist() == vocab.encode("low").tolist()


def test_characters_per_token_of_the_character_table_are_all_one():
    vocab = vocab_of("héllo\n")
    assert vocab.chars_per_token().tolist() == [1] * vocab.size  # end-of-text and unknown too


# ---------------------------------------------------------------------------- bytes

# Anything a str holds, lone surrogates included (they become U+FFFD).
any_text = st.text(st.characters(), max_size=100)


def utf8_of(text: str, nfc: bool) -> str:
    """What the byte tokenizer represents of ``text``: normalised, surrogates as U+FFFD."""
    return normalize_text("".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text), nfc)


@settings(max_examples=200, deadline=None)
@given(text=any_text, nfc=st.booleans())
def test_bytes_round_trip_any_text(text, nfc):
    vocab = ByteTokenizer(normalize_nfc=nfc)
    ids = vocab.encode(text)
    expected = utf8_of(text, nfc)
    assert ids.dtype == np.int64 and ids.tolist() == list(expected.encode("utf-8"))
    assert vocab.decode(ids) == expected
    assert vocab.unknown_chars(text) == []
    assert vocab.chars_per_token()[ids].sum() == len(expected)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 256), max_size=40), eot=st.sampled_from(["", "\n", "|"]))
def test_bytes_decode_and_stream_any_ids(ids, eot):
    """Like every tokenizer: the end-of-text token becomes ``eot``, and bytes that never
    form a character become U+FFFD; streaming one id at a time gives the same text."""
    vocab = ByteTokenizer()
    pieces = [eot.encode() if i == vocab.eot_id else bytes([i]) for i in ids]
    assert vocab.decode(ids, eot=eot) == b"".join(pieces).decode("utf-8", "replace")
    stream = vocab.stream()
    assert "".join(map(stream.push, ids)) + stream.flush() == vocab.decode(ids)


def test_bytes_layout_and_a_character_split_across_tokens():
    vocab = ByteTokenizer()
    assert (vocab.size, vocab.eot_id, vocab.unk_id, vocab.dtype) == (257, 256, None, np.uint16)
    euro = vocab.encode("€").tolist()
    assert euro == [0xE2, 0x82, 0xAC]
    stream = vocab.stream()
    assert [stream.push(i) for i in [ord("a"), *euro, vocab.eot_id]] == ["a", "", "", "€", ""]
    assert vocab.chars_per_token()[[ord("a"), *euro, vocab.eot_id]].tolist() == [1, 1, 0, 0, 1]


def test_bytes_description():
    vocab = ByteTokenizer(normalize_nfc=False)
    assert vocab.describe() == {"kind": "byte", "eot_id": 256, "normalize_nfc": False}
    again = from_description(vocab.describe())
    assert isinstance(again, ByteTokenizer) and again == vocab
    for bad, message in (({"eot_id": 0}, "must be 256"), ({"eot_id": True}, "must be 256"),
                         ({"normalize_nfc": 1}, "normalize_nfc")):
        with pytest.raises(TokenizerError, match=message):
            from_description({**vocab.describe(), **bad})


GOOD = {"kind": "char", "tokens": [EOT_TOKEN, UNK_TOKEN, "a"], "eot_id": 0, "unk_id": 1, "normalize_nfc": True}


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([], "JSON object"),
        ({**GOOD, "kind": "wordpiece"}, "kind 'wordpiece'"),
        ({**GOOD, "kind": []}, "kind \\[\\]"),
        ({**GOOD, "tokens": "abc"}, "'tokens' list"),
        ({**GOOD, "tokens": [EOT_TOKEN, UNK_TOKEN, "ab"]}, "single character"),
        ({**GOOD, "tokens": [EOT_TOKEN, UNK_TOKEN, "a", "a"]}, "twice"),
        ({**GOOD, "eot_id": 5}, "eot_id"),
        ({**GOOD, "eot_id": "0"}, "eot_id"),
        ({**GOOD, "unk_id": 0}, "differ"),
        ({**GOOD, "normalize_nfc": "yes"}, "normalize_nfc"),
        ({**GOOD, "tokens": [EOT_TOKEN, UNK_TOKEN, 7]}, "single character"),
    ],
)
def test_malformed_descriptions_are_refused(d, message):
    with pytest.raises(TokenizerError, match=message):
        from_description(d)


def test_line_ends_and_nfc_are_one_normalisation():
    assert normalize_text("a\r\nb\rc\n", nfc=False) == "a\nb\nc\n"
    assert normalize_text("e\u0301", nfc=True) == "\u00e9"
    vocab = vocab_of("ab\n")
    assert vocab.encode("a\r\nb").tolist() == vocab.encode("a\nb").tolist()


def test_dtype_uint8_up_to_254_characters_then_uint16():
    base = [chr(0x100 + i) for i in range(300)]
    assert vocab_of("".join(base[:254])).dtype == np.uint8  # 256 tokens
    wide = vocab_of("".join(base[:255]))  # 257 tokens
    assert wide.dtype == np.uint16
    text = "".join(base[250:255])
    assert wide.decode(wide.encode(text)) == text
    assert wide.lookup(np.array([0x100 + 254], dtype=np.uint32)).dtype == np.uint16


def test_vocabulary_too_large_for_uint16_is_a_clear_error():
    counts = np.zeros(0x110000, dtype=np.int64)
    counts[0x4E00 : 0x4E00 + 65535] = 1  # CJK and beyond: 65535 + 2 specials
    with pytest.raises(TokenizerError, match="smaller vocabulary"):
        CharTokenizer.from_char_counts(counts)


def test_tokenizers_import_only_numpy_and_stdlib():
    code = (
        "import sys, chargen.tokenizers\n"
        "heavy = {'torch', 'yaml', 'dvc', 'onnx', 'onnxruntime', 'typer'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Tokenizers: the character table's round trips, unknown characters, descriptions, dtypes,
and streaming decode."""

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

"""The character vocabulary: round trips, unknown characters, serialisation, dtypes."""

from __future__ import annotations

import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.vocab import EOT_TOKEN, UNK_TOKEN, Vocab, VocabError

# Any character a str can hold except lone surrogates, which no UTF-8 corpus contains.
chars = st.characters(exclude_categories=("Cs",))


def vocab_of(text: str, **kwargs) -> Vocab:
    counts = np.zeros(0x110000, dtype=np.int64)
    for ch in text:
        counts[ord(ch)] += 1
    return Vocab.from_char_counts(counts, **kwargs)


@settings(max_examples=200, deadline=None)
@given(alphabet=st.sets(chars, min_size=1, max_size=40), data=st.data())
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
    nfc = unicodedata.normalize("NFC", text)
    vocab = vocab_of(nfc, normalize_nfc=True)
    assert vocab.unknown_chars(text) == []
    assert vocab.decode(vocab.encode(text)) == nfc


@settings(max_examples=200, deadline=None)
@given(known=st.text(chars, min_size=1, max_size=30), text=st.text(chars, max_size=100))
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
    vocab = vocab_of("banana\n", eot_count=3)
    assert vocab.tokens == [EOT_TOKEN, UNK_TOKEN, "\n", "a", "b", "n"]
    assert vocab.counts == [3, 0, 1, 3, 1, 2]
    assert (vocab.eot_id, vocab.unk_id, vocab.size) == (0, 1, 6)


def test_min_char_count_sends_rare_characters_to_unknown():
    vocab = vocab_of("aaabbc", min_char_count=2)
    assert vocab.tokens[2:] == ["a", "b"]
    assert vocab.counts[vocab.unk_id] == 1  # the single "c"
    assert vocab.encode("abc").tolist() == [2, 3, vocab.unk_id]
    assert vocab.unknown_chars("cab") == ["c"]


def test_decode_specials():
    vocab = vocab_of("ab")
    ids = [2, vocab.eot_id, 3, vocab.unk_id, 2]
    assert vocab.decode(ids) == "ab\ufffda"
    assert vocab.decode(ids, eot="|", unk="?") == "a|b?a"
    assert vocab.decode([]) == ""
    with pytest.raises(VocabError, match="out of range"):
        vocab.decode([2, 4])
    with pytest.raises(VocabError, match="out of range"):
        vocab.decode([-1])


def test_nfc_applied_in_encode_only_when_the_vocab_says_so():
    decomposed = "e\u0301"
    nfc = vocab_of("\u00e9e\u0301", normalize_nfc=True)
    assert nfc.encode(decomposed).tolist() == nfc.encode("\u00e9").tolist()
    assert len(nfc.encode(decomposed)) == 1
    raw = vocab_of("\u00e9e\u0301", normalize_nfc=False)
    assert raw.decode(raw.encode(decomposed)) == decomposed


def test_dict_round_trip_and_equality():
    vocab = vocab_of("hello, world\n", eot_count=2, min_char_count=1, normalize_nfc=False)
    d = vocab.to_dict()
    assert set(d) == {"tokens", "counts", "eot_id", "unk_id", "normalize_nfc", "min_char_count"}
    again = Vocab.from_dict(d)
    assert again == vocab
    assert again.normalize_nfc is False
    assert again.encode("low").tolist() == vocab.encode("low").tolist()


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([], "mapping"),
        ({"tokens": "abc"}, "mapping"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, "ab"]}, "single character"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, "a", "a"]}, "twice"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, "a"], "eot_id": 5}, "eot_id"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, "a"], "unk_id": 0}, "differ"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, "a"], "counts": [1]}, "counts"),
        ({"tokens": [EOT_TOKEN, UNK_TOKEN, 7]}, "single character"),
    ],
)
def test_from_dict_rejects_malformed_vocabularies(d, message):
    with pytest.raises(VocabError, match=message):
        Vocab.from_dict(d)


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
    with pytest.raises(VocabError, match="min_char_count"):
        Vocab.from_char_counts(counts)


def test_inference_modules_import_only_numpy_and_stdlib():
    code = (
        "import sys, pipeline.vocab, pipeline.batches\n"
        "heavy = {'torch', 'yaml', 'dvc', 'onnx', 'onnxruntime', 'typer'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

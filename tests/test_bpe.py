"""The byte-level BPE tokenizer: the runtime's encoder against Hugging Face ``tokenizers``
(the training side) on arbitrary Unicode text, round trips, streaming, descriptions, and
deterministic training.

``pytest --hypothesis-profile soak`` runs many more examples per property, and the split of
every code point in every context.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import SOAK_EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

from chargen.tokenizers import (
    EOT_TOKEN,
    BPETokenizer,
    TokenizerError,
    from_description,
    normalize_text,
)
from pipeline.tokens import bpe_train

soak_only = pytest.mark.skipif(settings.default.max_examples < SOAK_EXAMPLES,
                               reason="pytest --hypothesis-profile soak only")

ROOT = Path(__file__).parents[1]
VOCAB_SIZE = 800

# --------------------------------------------------------------------------- corpus

ENGLISH = """\
ROMEO. But soft, what light through yonder window breaks? It's the east, and Juliet's the sun.
I'll not be tied to hours nor 'pointed times; we've 1,200 ducats and 3.5 pounds in 1599.
"Is this a dagger which I see before me?" -- he said...  She'd answer:  no!!  They're here?
\tIndented line\twith tabs;\r\nWindows line end, then   three spaces and trailing   \n\n\n
"""
# Letters of other scripts (some decomposed, so combining marks follow their base), digits
# that are not ASCII, emoji sequences, unusual spaces, and 4-byte characters.
SCRIPTS = [
    "café", "cafe\u0301", "naïve", "Ærø", "straße", "ĳssel", "œuvre",
    "αβγδ", "Ελλάδα", "привет", "мир", "日本語", "中文字", "東京", "ひらがな", "カタカナ",
    "한국어", "नमस्ते", "हिन्दी", "العربية", "עברית", "ไทย",
    "٠١٢٣", "१२३", "１２３", "Ⅻ", "½",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "𝐀𝐁𝐂", "𐍈",
    "\u00a0", "\u3000", "\u2003", "\u2028", "\x85", "\x1c",
    "“quoted”", "‘single’", "—", "…", "«»", "¿¡",
]


def corpus() -> list[str]:
    """A deterministic mixed corpus in which pairs repeat enough to be merged."""
    rng = random.Random(1234)
    words = ENGLISH.split(" ") + SCRIPTS + [EOT_TOKEN, "<|", "|>"]
    docs = [ENGLISH] * 20
    for _ in range(400):
        picked = rng.choices(words, k=rng.randint(5, 40))
        docs.append("".join(w + rng.choice([" ", " ", "", "\n", "  ", "\t"]) for w in picked))
    return docs


@pytest.fixture(scope="module")
def trained():
    return bpe_train.train_tokenizer(corpus(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def runtime(trained):
    return bpe_train.from_tokenizers(trained, normalize_nfc=False)


@pytest.fixture(scope="module")
def description(runtime):
    return runtime.describe()


@pytest.fixture(scope="module")
def twin(runtime):
    """Rebuilt from the description alone."""
    return to_tokenizers(from_description(runtime.describe()))


def to_tokenizers(bpe: BPETokenizer) -> Tokenizer:
    """The ``tokenizers`` twin of any ``BPETokenizer``: the same vocabulary, merges and
    pattern in the training side's configuration."""
    to_char = {b: c for c, b in bpe_train.byte_of_char().items()}
    texts = ["".join(to_char[b] for b in t) for t in bpe.token_bytes()]
    vocab = {text: i for i, text in enumerate(texts) if i != bpe.eot_id}
    vocab[EOT_TOKEN] = bpe.eot_id  # in the model's vocabulary too, so it keeps its id
    tokenizer = bpe_train.new_tokenizer(bpe.pattern)
    tokenizer.model = models.BPE(
        vocab, [(texts[a], texts[b]) for a, b in bpe.merges],
        unk_token=None, byte_fallback=False, fuse_unk=False, ignore_merges=False,
    )
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    tokenizer.encode_special_tokens = True  # not saved in tokenizers' JSON: set every time
    return tokenizer


def reference(tokenizer, text: str, nfc: bool = False) -> list[int]:
    """What ``tokenizers`` gives for text normalised as the runtime normalises it."""
    return tokenizer.encode(normalize_text(text, nfc)).ids


def oniguruma_split(pattern: str, text: str) -> list[str]:
    """The pieces ``tokenizers``' Split (Oniguruma) cuts ``text`` into."""
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


# --------------------------------------------------------------------------- strategies

SPACES = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", "\u00a0", "\u3000 ", " \u2028"]
fragments = st.one_of(
    st.sampled_from(ENGLISH.split(" ") + SCRIPTS),  # pieces the merges know
    st.text(max_size=6),  # anything: every code point but the surrogates
    st.sampled_from(SPACES).map(lambda s: s * 3),
    st.just(EOT_TOKEN),
    st.sampled_from(["'s", "'ll", "'re", "'d", "'", "''", "s'", "1999", "3.5", "..."]),
)
texts = st.one_of(st.text(), st.lists(fragments, max_size=25).map("".join))
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts_with_surrogates = st.lists(st.one_of(fragments, surrogates), max_size=20).map("".join)


# --------------------------------------------------------------------------- encoding


def test_trained_vocabulary_has_partial_characters(runtime):
    """Tokens that are fragments of multi-byte characters exist, so streaming is exercised."""
    assert runtime.size == VOCAB_SIZE
    partial = [t for t in runtime.token_bytes() if t and not _is_utf8(t)]
    assert len(partial) > 128  # more than the single bytes 0x80-0xff


@given(texts)
def test_split_matches_tokenizers(runtime, text):
    assert runtime.split(text) == oniguruma_split(runtime.pattern, text)


CONTEXTS = (" {}", "{}a", "{}", "{}1", "{}!", "{}  ", "'{}", "\t{}\xa0")


@pytest.mark.parametrize(
    ("context", "step"),
    [(" {}a", 37), *(pytest.param(c, 1, marks=soak_only) for c in CONTEXTS)],
)
def test_split_agrees_on_every_code_point(runtime, context, step):
    """Code points but the surrogates (every one of the 1,112,064 in the soak profile, every
    37th by default) in contexts that put each next to a letter, a digit, punctuation,
    spaces or an apostrophe: both engines cut the same pieces."""
    text = "".join(context.format(chr(c)) for c in range(0, 0x110000, step) if not 0xD800 <= c <= 0xDFFF)
    assert runtime.split(text) == oniguruma_split(runtime.pattern, text)


@given(texts)
def test_encode_matches_tokenizers(runtime, trained, twin, text):
    ids = runtime.encode(text)
    assert ids.dtype == np.int64
    assert ids.tolist() == reference(trained, text)
    assert ids.tolist() == reference(twin, text)


@given(texts)
def test_encode_twice_uses_cache_consistently(runtime, text):
    assert runtime.encode(text + text).tolist() == runtime.encode(text + text).tolist()


@given(texts)
def test_round_trip(runtime, text):
    assert runtime.decode(runtime.encode(text)) == normalize_text(text, nfc=False)


@given(texts_with_surrogates)
def test_characters_per_token_add_up_to_the_text(runtime, text):
    """Tokens that end inside a character count it once, where it starts: the per-character
    loss divides by the length of the text."""
    ids = runtime.encode(text)
    assert runtime.chars_per_token()[ids].sum() == len(runtime.decode(ids))
    assert runtime.chars_per_token()[runtime.eot_id] == 1


@given(texts_with_surrogates)
def test_lone_surrogates_encode_as_replacement_character(runtime, trained, text):
    cleaned = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert runtime.encode(text).tolist() == reference(trained, cleaned)
    assert runtime.decode(runtime.encode(text)) == normalize_text(cleaned, nfc=False)


def test_special_token_string_is_plain_text(runtime, trained):
    ids = runtime.encode(f"a{EOT_TOKEN}b").tolist()
    assert runtime.eot_id not in ids
    assert ids == trained.encode(f"a{EOT_TOKEN}b").ids
    assert runtime.decode(ids) == f"a{EOT_TOKEN}b"


@given(texts)
def test_nfc_is_applied_before_encoding(description, trained, text):
    nfc = from_description({**description, "normalize_nfc": True})
    assert nfc.encode(text).tolist() == reference(trained, text, nfc=True)
    assert nfc.decode(nfc.encode(text)) == unicodedata.normalize("NFC", normalize_text(text, False))


def test_empty_text(runtime):
    assert runtime.encode("").dtype == np.int64
    assert runtime.encode("").size == 0
    assert runtime.decode([]) == ""


def test_long_pieces_encode_like_tokenizers(runtime, trained):
    """Pieces of many thousand bytes (a run of spaces, unspaced CJK) keep their merge order."""
    for text in (" " * 5000 + "x", "日本語中文字東京" * 2000, "ab" * 10_000):
        assert runtime.encode(text).tolist() == reference(trained, text)


@given(texts, st.lists(st.integers(0, 300), max_size=6))
def test_chunks_cut_at_safe_places_encode_like_the_whole(runtime, text, ends):
    """The encode stage reads a corpus in chunks; cut there, nothing changes."""
    cuts = sorted({c for e in ends if (c := bpe_train.safe_cut(text, e)) is not None})
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert [i for part in parts for i in runtime.encode(part).tolist()] == runtime.encode(text).tolist()


@given(st.lists(st.tuples(st.integers(0, 2), texts), max_size=8), st.integers(1, 40))
def test_safe_chunks_encode_like_each_split_whole(runtime, pieces, max_carry):
    """The encode stage's chunks: within a split, encoding chunk by chunk equals encoding its
    text whole, except where text with no safe cut outgrew max_carry and was cut anyway."""
    pieces = sorted(pieces, key=lambda p: p[0])  # a document's pieces come split by split
    chunks = list(bpe_train.safe_chunks(iter(pieces), max_carry))
    for k in range(3):
        whole = "".join(text for split, text in pieces if split == k)
        mine = [text for split, text in chunks if split == k]
        assert "".join(mine) == whole
        ends = list(itertools.accumulate(len(c) for c in mine))[:-1]  # the cuts, in the split's text
        forced = [c for c, end in zip(mine[:-1], ends, strict=True) if bpe_train.safe_cut(whole, end) != end]
        if not forced:
            assert [i for c in mine for i in runtime.encode(c).tolist()] == runtime.encode(whole).tolist()
        assert all(len(c) > max_carry for c in forced)


@given(st.lists(texts, max_size=6), st.integers(1, 60))
def test_text_file_pieces_encode_like_the_whole(runtime, parts, piece):
    """`chargen eval` reads a file in pieces; with a BPE model, too, their ids are the whole's."""
    from chargen.textfile import TextSource

    text = "x\n".join(parts)
    pieces = list(TextSource(io.BytesIO(text.encode("utf-8")), "t").pieces(piece))
    assert "".join(pieces) == text.replace("\r\n", "\n").replace("\r", "\n")
    assert [i for p in pieces for i in runtime.encode(p).tolist()] == runtime.encode("".join(pieces)).tolist()


def test_safe_cut_is_before_a_space_after_printable_ascii():
    assert bpe_train.safe_cut("ab cd ef", 7) == 5
    assert bpe_train.safe_cut("ab cd ef", 4) == 2
    assert bpe_train.safe_cut("ab  cd", 5) == 2  # not inside a run of spaces
    assert bpe_train.safe_cut("日本 語", 4) is None
    assert bpe_train.safe_cut(" ab", 2) is None


# --------------------------------------------------------------------------- decoding


@given(st.data())
def test_decode_matches_tokenizers(runtime, trained, data):
    """Any id sequence, including ones that cut characters apart or end mid-character."""
    ids = data.draw(st.lists(st.integers(0, runtime.size - 1), max_size=30))
    assert runtime.decode(ids) == trained.decode(ids)


@given(st.data())
def test_stream_equals_decode(runtime, data):
    ids = data.draw(st.lists(st.integers(0, runtime.size - 1), max_size=30))
    stream = runtime.stream()
    assert "".join(map(stream.push, ids)) + stream.flush() == runtime.decode(ids)


def test_stream_holds_back_a_split_character(runtime):
    euro = "€".encode()  # 3 bytes
    ids = [runtime.token_bytes().index(bytes([b])) for b in euro]
    stream = runtime.stream()
    assert [stream.push(i) for i in ids] == ["", "", "€"]
    assert stream.push(ids[0]) == "" and stream.flush() == "\ufffd"


def test_decode_rejects_out_of_range(runtime):
    with pytest.raises(TokenizerError, match="out of range"):
        runtime.decode([runtime.size])


# --------------------------------------------------------------------------- arbitrary merges


SPLIT_PATTERN = bpe_train.split_pattern()


@st.composite
def random_descriptions(draw) -> dict:
    """Merge lists in any order, with pairs that rebuild an existing token and pairs listed
    twice: orders a trainer never writes, where merge-order rules would show."""
    tokens: list[bytes | None] = [None] + [bytes([b]) for b in range(256)]
    ids_of = {t: i for i, t in enumerate(tokens) if t}
    pool = [ids_of[bytes([b])] for b in b"ab \n\xc3\xa9"]
    merges = []
    for _ in range(draw(st.integers(0, 25))):
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        merged = tokens[a] + tokens[b]
        if merged not in ids_of:
            ids_of[merged] = len(tokens)
            tokens.append(merged)
            pool.append(ids_of[merged])
        merges.append([a, b])
    return {
        "kind": "bpe",
        "eot_id": 0,
        "normalize_nfc": False,
        "pattern": draw(st.sampled_from([None, SPLIT_PATTERN])),
        "tokens": [None if t is None else t.hex() for t in tokens],
        "merges": draw(st.permutations(merges)),
    }


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(random_descriptions(), st.text(alphabet="ab \né", max_size=40))
def test_any_merge_order_encodes_like_tokenizers(description, text):
    runtime = from_description(description)
    assert runtime.encode(text).tolist() == reference(to_tokenizers(runtime), text)


def test_leftmost_lowest_rank_first_not_all_occurrences():
    """After 'ab' forms at the left, (ab, a) outranks the second (a, b): 'abab' -> aba + b,
    where merging every occurrence of a pair at once would give ab + ab."""
    tokens = [None] + [bytes([b]) for b in range(256)] + [b"ab", b"aba"]
    a, b, ab = ord("a") + 1, ord("b") + 1, 257
    description = {
        "kind": "bpe", "eot_id": 0, "normalize_nfc": False, "pattern": None,
        "tokens": [None if t is None else t.hex() for t in tokens], "merges": [[ab, a], [a, b]],
    }
    runtime = from_description(description)
    assert runtime.encode("abab").tolist() == [258, b]
    assert to_tokenizers(runtime).encode("abab").ids == [258, b]


def test_byte_level_without_merges_is_the_byte_tokenizer():
    description = {
        "kind": "bpe", "eot_id": 256, "normalize_nfc": False, "pattern": None,
        "tokens": [bytes([b]).hex() for b in range(256)] + [None], "merges": [],
    }
    runtime = from_description(description)
    text = "héllo, 世界 😀"
    assert runtime.encode(text).tolist() == list(text.encode())
    assert runtime.decode(runtime.encode(text)) == text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eot_id": 5}, "without bytes"),
        ({"eot_id": "0"}, "integer"),
        ({"normalize_nfc": None}, "true or false"),
        ({"merges": [[1, 999_999]]}, "outside the vocabulary"),
        ({"merges": [[1, 2, 3]]}, "pairs"),
        ({"merges": [[1, 2.0]]}, "pairs"),
        ({"merges": [[True, 2]]}, "pairs"),
        ({"merges": None}, "pairs"),
        ({"tokens": None}, "list of hex"),
        ({"tokens": [None, 7]}, "list of hex"),
        ({"tokens": ["zz"]}, "not hex"),
        ({"tokens": [None, ""]}, "non-empty"),
        ({"pattern": "(a)|b"}, "capture"),
        ({"pattern": "("}, "bad split pattern"),
    ],
)
def test_malformed_descriptions_are_refused(description, change, message):
    with pytest.raises(TokenizerError, match=message):
        from_description({**description, **change})


def test_a_description_without_a_pattern_key_is_refused(description):
    with pytest.raises(TokenizerError, match="'pattern'"):
        from_description({k: v for k, v in description.items() if k != "pattern"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(key=st.sampled_from(["kind", "eot_id", "normalize_nfc", "pattern", "tokens", "merges"]),
       value=json_values, data=st.data())
def test_any_edit_of_a_description_loads_or_is_a_tokenizer_error(description, key, value, data):
    """A damaged model file is one clear error, whatever the damage: a field replaced, or
    one entry of the tokens or merges."""
    edited = {**description, key: value}
    if key in ("tokens", "merges") and data.draw(st.booleans()):
        entries = list(description[key])
        entries[data.draw(st.integers(0, len(entries) - 1))] = value
        edited[key] = entries
    try:
        from_description(edited)
    except TokenizerError:
        pass


def test_description_round_trips(description, runtime):
    again = from_description(json.loads(json.dumps(description)))
    assert isinstance(again, BPETokenizer)
    assert again == runtime


# --------------------------------------------------------------------------- training


def test_training_is_deterministic(tmp_path):
    """Same corpus, same merges: in one process, and across processes, hash seeds and
    thread counts (the trainer counts in parallel)."""
    docs = corpus()
    first = bpe_train.train(docs, VOCAB_SIZE).describe()
    assert bpe_train.train(docs, VOCAB_SIZE).describe() == first
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(docs), encoding="utf-8")
    script = (
        "import hashlib, json, sys; from pipeline.tokens import bpe_train; "
        f"d = bpe_train.train(json.load(open(sys.argv[1], encoding='utf-8')), {VOCAB_SIZE}).describe(); "
        "print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())"
    )
    want = hashlib.sha256(json.dumps(first, sort_keys=True).encode()).hexdigest()
    for threads, seed in (("1", "0"), ("4", "2")):
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "PYTHONHASHSEED": seed,
               "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", script, str(path)], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_trained_ids_are_special_then_bytes_then_merges(description):
    assert description["eot_id"] == 0 and description["tokens"][0] is None
    assert sorted(bytes.fromhex(t) for t in description["tokens"][1:257]) == [
        bytes([b]) for b in range(256)
    ]


def test_vocabulary_size_is_checked():
    with pytest.raises(ValueError, match="below"):
        bpe_train.train(["abc"], 100)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

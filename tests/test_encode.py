"""The encode stage: vocabulary, per-document splits, split files, streaming, errors."""

from __future__ import annotations

import json
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import project_params, run_stage_script, write_corpus
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chargen.errors import ChargenError
from chargen.tokenizers import CharTokenizer, from_description
from chargen.tokenizers.char import codepoints
from pipeline.params import EncodeParams
from pipeline.tokens import utf8
from pipeline.tokens.encode import encode_corpus, split_sizes
from pipeline.tokens.utf8 import ChunkEncoder, count_chunk, decode_chunk, iter_text


def read_split(out: Path, split: str) -> tuple[CharTokenizer, str]:
    """A split file decoded, with end-of-text shown as '|'."""
    vocab = from_description(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")))
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    return vocab, vocab.decode(ids, eot="|")


def encode_params(**kw) -> EncodeParams:
    """The project's encode params with ``kw`` changed."""
    return EncodeParams(**{**project_params()["encode"], **kw})


def params(tmp_path: Path, **kw) -> EncodeParams:
    return encode_params(out_dir=str(tmp_path / "encoded"), **kw)


@pytest.mark.parametrize("chunk", [1_000_000, 7])  # one chunk per document, or many
def test_each_document_is_split_train_val_test_from_its_end(tmp_path, chunk):
    a = "".join(chr(ord("a") + i % 13) for i in range(100))
    b = "".join(chr(ord("n") + i % 13) for i in range(60))
    write_corpus(tmp_path / "raw", [("a.txt", a), ("b.txt", b)])
    p = params(tmp_path, train_frac=0.8, val_frac=0.1, test_frac=0.1, chunk_chars=chunk)
    meta = encode_corpus(tmp_path / "raw", p)
    out = tmp_path / "encoded"
    assert read_split(out, "train")[1] == a[:80] + "|" + b[:48] + "|"
    assert read_split(out, "val")[1] == a[80:90] + "|" + b[48:54] + "|"
    assert read_split(out, "test")[1] == a[90:] + "|" + b[54:] + "|"
    assert meta["splits"] == {"train": 130, "val": 18, "test": 18}
    assert meta["documents"] == 2 and meta["dtype"] == "uint8"
    assert meta == json.loads((out / "meta.json").read_text(encoding="utf-8"))
    for split, n in meta["splits"].items():
        assert (out / f"{split}.bin").stat().st_size == n


def test_token_counts_match_the_split_files(tmp_path):
    write_corpus(tmp_path / "raw", [("x.txt", "hello world\n" * 30), ("y.txt", "good bye\n" * 30)])
    meta = encode_corpus(tmp_path / "raw", params(tmp_path))
    out = tmp_path / "encoded"
    vocab = from_description(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")))
    ids = np.concatenate([np.fromfile(out / f"{s}.bin", np.uint8) for s in ("train", "val", "test")])
    assert np.bincount(ids, minlength=vocab.size).tolist() == meta["token_counts"]
    assert meta["token_counts"][vocab.eot_id] == 6  # two documents, three slices each


# Words, spaces and multi-byte characters, so byte and BPE tokens cut characters apart.
PROSE = "the café is full — “nobody goes there”, she said. 日本の猫  and  € 12.50\n"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
@pytest.mark.parametrize("chunk", [1_000_000, 7])
def test_byte_and_bpe_splits_hold_each_documents_slices(tmp_path, kind, chunk):
    a, b = PROSE * 12, PROSE[::-1] * 9
    write_corpus(tmp_path / "raw", [("a.txt", a), ("b.txt", b)])
    p = params(tmp_path, tokenizer=kind, vocab_size=320, chunk_chars=chunk)
    meta = encode_corpus(tmp_path / "raw", p)
    out = tmp_path / "encoded"
    (na, va, _), (nb, vb, _) = split_sizes(len(a), p), split_sizes(len(b), p)
    assert read_split(out, "train")[1] == a[:na] + "|" + b[:nb] + "|"
    assert read_split(out, "val")[1] == a[na : na + va] + "|" + b[nb : nb + vb] + "|"
    assert read_split(out, "test")[1] == a[na + va :] + "|" + b[nb + vb :] + "|"
    vocab = read_split(out, "train")[0]
    assert vocab.kind == kind and meta["vocab_size"] == vocab.size and meta["dtype"] == "uint16"
    # Characters as the per-character losses count them: each end-of-text counts as one.
    assert meta["chars"] == {"train": na + nb + 2, "val": va + vb + 2, "test": len(a) + len(b) - na - nb - va - vb + 2}
    for split in ("train", "val", "test"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert len(ids) == meta["splits"][split] and vocab.chars_per_token()[ids].sum() == meta["chars"][split]
        # the runtime encodes each slice as the stage did
        text = read_split(out, split)[1].split("|")[0]
        assert ids[: list(ids).index(vocab.eot_id)].tolist() == vocab.encode(text).tolist()


def test_bpe_is_learned_from_the_train_split_only_and_deterministically(tmp_path):
    train_text = "the cat sat on the mat. " * 60
    unseen = " zyzzyva zyzzyva zyzzyva zyzzyva zyzzyva zyzzyva zyzzyva zyzzyva"
    write_corpus(tmp_path / "raw", [("a.txt", train_text + unseen)])  # the unseen words fall in val/test
    p = params(tmp_path, tokenizer="bpe", vocab_size=300)
    assert split_sizes(len(train_text + unseen), p)[0] <= len(train_text)
    encode_corpus(tmp_path / "raw", p)
    first = (tmp_path / "encoded" / "tokenizer.json").read_bytes()
    vocab = read_split(tmp_path / "encoded", "train")[0]
    assert vocab.encode(" cat").size == 1 and vocab.encode(" zyzzyva").size > 3
    encode_corpus(tmp_path / "raw", p)
    assert (tmp_path / "encoded" / "tokenizer.json").read_bytes() == first


def test_bpe_vocabulary_size_is_checked_and_a_short_one_reported(tmp_path, capsys):
    write_corpus(tmp_path / "raw", [("a.txt", "abab cdcd " * 30)])
    with pytest.raises(ChargenError, match="encode.vocab_size: a bpe vocabulary needs 258 to 65536 tokens"):
        encode_corpus(tmp_path / "raw", params(tmp_path, tokenizer="bpe", vocab_size=257))
    assert not (tmp_path / "encoded").exists()
    meta = encode_corpus(tmp_path / "raw", params(tmp_path, tokenizer="bpe", vocab_size=4096))
    err = capsys.readouterr().err
    assert meta["vocab_size"] < 300 and f"for only {meta['vocab_size']} tokens" in err
    assert err.startswith("warning: encode.vocab_size=4096") and err.count("\n") == 1


def test_split_sizes_round_val_and_test_and_give_train_the_rest():
    p = encode_params()
    assert (p.train_frac, p.val_frac, p.test_frac) == (0.9, 0.05, 0.05)
    assert split_sizes(1000, p) == (900, 50, 50)
    assert split_sizes(30, p) == (26, 2, 2)  # 1.5 rounds up
    assert split_sizes(5, p) == (5, 0, 0)
    assert split_sizes(0, p) == (0, 0, 0)
    assert split_sizes(3, encode_params(train_frac=0.1, val_frac=0.45, test_frac=0.45)) == (1, 1, 1)
    for n in range(200):
        assert sum(split_sizes(n, p)) == n


def test_empty_slices_get_no_end_of_text(tmp_path):
    write_corpus(tmp_path / "raw", [("big.txt", "ab" * 100), ("tiny.txt", "xyz"), ("none.txt", "")])
    meta = encode_corpus(tmp_path / "raw", params(tmp_path))
    out = tmp_path / "encoded"
    assert read_split(out, "train")[1] == "ab" * 90 + "|xyz|"
    assert read_split(out, "val")[1] == "ab" * 5 + "|"
    assert meta["documents"] == 3


def test_uint16_when_the_vocabulary_has_more_than_254_characters(tmp_path):
    text = "".join(chr(0x100 + i) for i in range(300)) * 3
    write_corpus(tmp_path / "raw", [("wide.txt", text)])
    meta = encode_corpus(tmp_path / "raw", params(tmp_path))
    out = tmp_path / "encoded"
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 302
    assert (out / "train.bin").stat().st_size == 2 * meta["splits"]["train"]
    n_train = split_sizes(len(text), encode_params())[0]
    assert read_split(out, "train")[1] == text[:n_train] + "|"


def test_rare_characters_become_the_unknown_token(tmp_path):
    write_corpus(tmp_path / "raw", [("d.txt", "aaaa bbbb q " * 20 + "\u00e6")])
    meta = encode_corpus(tmp_path / "raw", params(tmp_path, min_char_count=2))
    vocab, test = read_split(tmp_path / "encoded", "test")
    assert "\u00e6" not in vocab.tokens and "q" in vocab.tokens
    assert meta["token_counts"][vocab.unk_id] == 1
    assert test.endswith("\ufffd|")


def test_a_vocabulary_that_collapses_is_warned_about(tmp_path, capsys):
    write_corpus(tmp_path / "raw", [("d.txt", "aaaa bbbb q " * 20)])
    encode_corpus(tmp_path / "raw", params(tmp_path, min_char_count=10_000))
    err = capsys.readouterr().err
    assert err.startswith("warning: encode.min_char_count=10000 maps 100.0% of the characters")
    assert "lower encode.min_char_count" in err and err.count("\n") == 1


def test_nfc_and_line_endings(tmp_path):
    text = "Cafe\u0301 na\u00efve\r\nline two\rthree\n" * 10
    write_corpus(tmp_path / "raw", [("d.txt", text)])
    encode_corpus(tmp_path / "raw", params(tmp_path))
    vocab, train = read_split(tmp_path / "encoded", "train")
    normalized = "Caf\u00e9 na\u00efve\nline two\nthree\n" * 10
    assert train == normalized[: split_sizes(len(normalized), encode_params())[0]] + "|"
    assert "\u0301" not in vocab.tokens and vocab.normalize_nfc

    encode_corpus(tmp_path / "raw", params(tmp_path, normalize_nfc=False))
    vocab, train = read_split(tmp_path / "encoded", "train")
    assert "\u0301" in vocab.tokens and not vocab.normalize_nfc
    assert train.startswith("Cafe\u0301 ")


def test_small_chunks_give_byte_identical_outputs(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = list("abc de\n\r") + ["\u00e9", "e\u0301", "\u4e2d", "\U0001f600", "\u1100\u1161"]
    docs = [(f"d{i}.txt", "".join(rng.choice(alphabet, size=3000))) for i in range(4)]
    write_corpus(tmp_path / "raw", docs)
    big = encode_corpus(tmp_path / "raw", encode_params(out_dir=str(tmp_path / "big")))
    small = encode_corpus(tmp_path / "raw", encode_params(out_dir=str(tmp_path / "small"), chunk_chars=7))
    assert big == small
    for name in ("train.bin", "val.bin", "test.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()


# Characters that stress chunk cuts: multi-byte UTF-8, CRLF, combining marks whose
# order NFC fixes, pairs NFC composes (e + U+0301, Hangul jamo), non-starter decompositions.
tricky = st.sampled_from(
    ["a", "e", " ", "\n", "\r", "\u00e9", "\u0301", "\u0323", "\u0345", "\u1100", "\u1161",
     "\u11a8", "\uac00", "\u0f71", "\u0f73", "\u0344", "\u4e2d", "\U0001f600", "\u0b47", "\u0b3e"]
)


@settings(max_examples=150, deadline=None)
@given(text=st.text(tricky, max_size=60), chunk=st.integers(1, 9), nfc=st.booleans())
def test_chunked_reading_equals_reading_whole(tmp_path_factory, text, chunk, nfc):
    path = tmp_path_factory.mktemp("chunks") / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    if nfc:
        expected = unicodedata.normalize("NFC", expected)
    raw = []
    assert "".join(iter_text(path, chunk, nfc, raw.append)) == expected
    assert b"".join(raw) == text.encode("utf-8")


# ------------------------------------------------------------------ numpy fast paths


def _damage(data: bytes, at: int, byte: int) -> bytes:
    if not data:
        return bytes([byte])
    at %= len(data)
    return data[:at] + bytes([byte]) + data[at + 1 :]


utf8_or_not = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40).map(str.encode),
    st.builds(_damage, st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
              st.integers(0, 200), st.integers(0x80, 0xFF)),
    st.binary(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(data=utf8_or_not)
# the edges of valid UTF-8: overlong forms, surrogates, beyond U+10FFFF, truncation
@example(data=b"\xc0\x80")
@example(data=b"\xe0\x80\x80")
@example(data=b"\xf0\x80\x80\x80")
@example(data=b"\xed\xa0\x80")
@example(data=b"\xed\x9f\xbf")
@example(data=b"\xf4\x90\x80\x80")
@example(data=b"\xf4\x8f\xbf\xbf")
@example(data=b"\xf8\x88\x80\x80\x80")
@example(data=b"\xe2\x82")
@example(data=b"\x80")
@example(data=b"\xf0\x9f\x98\x80\xef\xbf\xbf")
def test_numpy_utf8_reader_agrees_with_python(data):
    pad = b"x" * (8 * len(data) + 8)  # sparse enough for the numpy reader
    padded = pad + data + pad
    u8 = np.frombuffer(padded, dtype=np.uint8)
    n_cont = int(((u8 & 0xC0) == 0x80).sum())
    found = utf8._multibyte_chars(u8, n_cont)
    try:
        text = padded.decode("utf-8")
    except UnicodeDecodeError:
        assert found is None
        return
    assert found is not None
    cps = codepoints(text)
    wide = np.flatnonzero(cps >= 0x80)
    assert found[0].tolist() == wide.tolist()
    assert found[1].tolist() == cps[wide].tolist()


def test_numpy_utf8_reader_leaves_dense_text_to_python():
    u8 = np.frombuffer("Привет, мир\n".encode(), dtype=np.uint8)
    assert utf8._multibyte_chars(u8, int(((u8 & 0xC0) == 0x80).sum())) is None


# Base characters followed by marks, so that NFC has plenty to compose and reorder.
clusters = st.lists(
    st.tuples(
        st.sampled_from(["a", "e", "o", " ", "\n", "\r", "\u00e9", "\u1100", "\uac00", "\u0b47",
                         "\u4e2d", "\U0001f600", "\u2126", "\u0958"]),
        st.lists(st.sampled_from(["\u0301", "\u0323", "\u0345", "\u0308", "\u1161", "\u11a8",
                                  "\u0b3e", "\u0344", "\u0f71", "\u0f73"]), max_size=3),
    ),
    max_size=12,
).map(lambda cs: "".join(base + "".join(marks) for base, marks in cs))
chunk_text = st.one_of(clusters, st.text(st.characters(exclude_categories=("Cs",)), max_size=30))


@settings(max_examples=300, deadline=None)
@given(text=chunk_text, sparse=st.booleans(), nfc=st.booleans(), wide=st.booleans())
# NFC's kinds of change: compose, reorder marks, compose Hangul, singleton, CR
@example(text="e\u0301", sparse=True, nfc=True, wide=False)
@example(text="a\u0301\u0323", sparse=True, nfc=True, wide=True)
@example(text="\u1100\u1161", sparse=True, nfc=True, wide=False)
@example(text="\u2126", sparse=True, nfc=True, wide=False)
@example(text="x\r\ny\u00e9", sparse=True, nfc=False, wide=False)
def test_fast_paths_give_what_decoding_gives(text, sparse, nfc, wide):
    # sparse: enough ASCII around the text for the numpy reader to take it
    pad = "a" * (8 * len(text.encode("utf-8")) if sparse else 0)
    raw = (pad + text + pad).encode("utf-8")
    reference = codepoints(decode_chunk(raw, Path("doc.txt"), 0, nfc))

    n, counts = count_chunk(raw, Path("doc.txt"), 0, nfc)
    assert n == len(reference)
    expected = np.bincount(reference, minlength=len(counts))
    assert counts.tolist() == expected.tolist()

    extra = "".join(chr(0x3400 + i) for i in range(300)) if wide else ""
    vocab_counts = np.zeros(0x110000, dtype=np.int64)
    vocab_counts[: len(counts)] += counts
    vocab_counts[[ord(c) for c in extra]] += 1
    vocab_counts[ord("a")] = 0  # one character the vocabulary lacks: unknown
    vocab = CharTokenizer.from_char_counts(vocab_counts, normalize_nfc=nfc)
    ids = ChunkEncoder(vocab).ids(raw, Path("doc.txt"), 0)
    assert ids.dtype == vocab.dtype
    assert ids.tolist() == vocab.lookup(reference).tolist()


def test_typical_text_never_goes_through_str(monkeypatch):
    def no_str(*args):
        raise AssertionError("took the str path")

    monkeypatch.setattr(utf8, "decode_chunk", no_str)
    line = "The caf\u00e9 was full \u2014 \u201cnobody goes there any more,\u201d she said.\n"
    raw = line.encode() * 50
    n, counts = count_chunk(raw, Path("doc.txt"), 0, True)
    assert n == len(raw.decode())
    vocab = CharTokenizer.from_char_counts(counts)
    assert vocab.decode(ChunkEncoder(vocab).ids(raw, Path("doc.txt"), 0)) == raw.decode()


def test_corpus_hash_is_stable_and_tracks_content(tmp_path):
    write_corpus(tmp_path / "raw", [("a.txt", "some text\n" * 10)])
    first = encode_corpus(tmp_path / "raw", params(tmp_path))["corpus_sha256"]
    assert encode_corpus(tmp_path / "raw", params(tmp_path))["corpus_sha256"] == first
    write_corpus(tmp_path / "raw", [("a.txt", "other text\n" * 10)])
    assert encode_corpus(tmp_path / "raw", params(tmp_path))["corpus_sha256"] != first


def bad_utf8(raw: Path) -> None:
    write_corpus(raw, [("ok.txt", "fine\n"), ("bad.txt", b"abc\xff\xfedef")])


def no_manifest(raw: Path) -> None:
    raw.mkdir()


def empty_list(raw: Path) -> None:
    write_corpus(raw, [])


def all_empty(raw: Path) -> None:
    write_corpus(raw, [("a.txt", ""), ("b.txt", "")])


def missing_doc(raw: Path) -> None:
    write_corpus(raw, [("a.txt", "text")])
    (raw / "a.txt").unlink()


def outside(raw: Path) -> None:
    write_corpus(raw, [("a.txt", "text")])
    (raw / "manifest.json").write_text(json.dumps({"documents": [{"file": "../secret.txt"}]}))


def edited(raw: Path) -> None:
    write_corpus(raw, [("a.txt", "text")])
    (raw / "a.txt").write_text("changed")


def not_json(raw: Path) -> None:
    raw.mkdir()
    (raw / "manifest.json").write_text("{nope")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "raw corpus directory not found; run `dvc repro download`"),
        (no_manifest, "manifest.json: not found"),
        (not_json, "unreadable corpus manifest"),
        (empty_list, "lists no documents"),
        (all_empty, "documents are empty"),
        (missing_doc, "listed in the manifest but missing"),
        (outside, "points outside"),
        (edited, "do not match the sha256"),
        (bad_utf8, "bad.txt: not valid UTF-8 at byte 3"),
    ],
)
def test_bad_corpus_is_a_clear_error_and_keeps_old_outputs(tmp_path, make, message):
    raw = tmp_path / "raw"
    if make is not None:
        make(raw)
    out = tmp_path / "encoded"
    out.mkdir()
    (out / "previous").write_text("kept")
    with pytest.raises(ChargenError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_corpus(raw, params(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs
    assert (out / "previous").read_text() == "kept"


def run_stage(cwd: Path, raw: Path, min_count: int = 1) -> subprocess.CompletedProcess:
    params = project_params()
    params["download"].update(sources=[{"name": "local", "path": "corpus"}], out_dir=str(raw))
    params["encode"].update(out_dir=str(cwd / "encoded"), min_char_count=min_count)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return run_stage_script("encode", cwd)


def test_stage_script_encodes_and_reports(tmp_path):
    write_corpus(tmp_path / "raw", [("a.txt", "to be or not to be\n" * 20)])
    done = run_stage(tmp_path, tmp_path / "raw")
    assert done.returncode == 0, done.stderr
    assert "encoded 1 documents" in done.stdout and "train 343" in done.stdout
    assert sorted(p.name for p in (tmp_path / "encoded").iterdir()) == [
        "meta.json", "test.bin", "tokenizer.json", "train.bin", "val.bin"]


@pytest.mark.parametrize(
    ("setup", "min_count", "message"),
    [
        ("missing", 1, "error: "),
        ("ok", 0, "error: encode.min_char_count: must be >= 1, got 0"),
    ],
)
def test_stage_script_errors_are_one_line(tmp_path, setup, min_count, message):
    if setup == "ok":
        write_corpus(tmp_path / "raw", [("a.txt", "text\n")])
    done = run_stage(tmp_path, tmp_path / "raw", min_count)
    assert done.returncode == 1
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "encoded").exists()

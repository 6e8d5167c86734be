"""The draft table (chargen/draft.py, pipeline/export/draft.py): what it guesses, how it
travels in the model file, and a malformed one refused in one line."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargen import contract
from chargen.draft import MAX_BITS, NGramDraft, context_buckets, table_dtype
from chargen.model import ChargenModel
from pipeline.export.draft import build_draft
from pipeline.export.proto import set_metadata


def test_each_bucket_guesses_the_most_frequent_next_token() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=3000)  # few symbols: every 2-token context is seen often
    draft = build_draft(ids, vocab_size=6, context=2, bits=12)
    buckets = context_buckets(ids[:-1], 2, 6, 12)
    followers: dict[int, Counter] = {}
    for b, nxt in zip(buckets.tolist(), ids[2:].tolist(), strict=True):
        followers.setdefault(b, Counter())[nxt] += 1
    for b, counts in followers.items():
        best = max(counts.values())
        assert draft.table[b] == min(t for t, c in counts.items() if c == best)  # ties: the lowest id
    unseen = np.setdiff1d(np.arange(1 << 12), list(followers))
    assert (draft.table[unseen] == draft.none).all()


def test_a_repeated_phrase_is_guessed_and_an_unseen_context_is_not() -> None:
    ids = np.array([5, 1, 2, 3, 4] * 20)
    draft = build_draft(ids, vocab_size=8, context=2, bits=10)
    assert draft.propose([0, 5, 1], 3) == [2, 3, 4]  # follows its own guesses
    assert draft.propose([7, 7], 3) == []  # a context the text never had


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 199), min_size=3, max_size=12), st.integers(1, 3))
def test_the_runtime_hashes_a_context_as_the_builder_does(history: list[int], context: int) -> None:
    """propose's Python arithmetic and context_buckets' numpy arithmetic pick one bucket."""
    table = (np.arange(256) % 200).astype(table_dtype(200))  # every bucket guesses its own number
    draft = NGramDraft(table, context, vocab_size=200)
    bucket = int(context_buckets(np.array(history[-context:]), context, 200, 8)[0])
    assert draft.propose(history, 1) == [bucket % 200]


def test_a_bucket_guesses_only_a_next_token_seen_min_count_times() -> None:
    ids = np.array([1, 2, 3] * 4 + [4, 5, 6] * 2 + [7])  # after (1, 2): 3, four times; after (4, 5): 6, twice
    full = build_draft(ids, vocab_size=8, context=2, bits=10)
    pruned = build_draft(ids, vocab_size=8, context=2, bits=10, min_count=3)
    assert full.propose([1, 2], 1) == pruned.propose([1, 2], 1) == [3]
    assert full.propose([4, 5], 1) == [6] and pruned.propose([4, 5], 1) == []
    assert (pruned.table != pruned.none).sum() < (full.table != full.none).sum()
    with pytest.raises(ValueError, match="min_count"):
        build_draft(ids, vocab_size=8, context=2, bits=10, min_count=0)


def test_the_table_is_stored_compressed_and_a_raw_table_still_loads() -> None:
    rng = np.random.default_rng(1)
    draft = build_draft(rng.integers(0, 5, size=400), vocab_size=5, context=3, bits=12)
    d = draft.describe()
    assert d["encoding"] == "zlib" and len(d["table"]) < draft.table.nbytes  # smaller than the raw bytes
    raw = {**d, "table": base64.b64encode(draft.table.tobytes()).decode("ascii")}
    del raw["encoding"]
    for description in (d, raw):
        assert (NGramDraft.from_description(description, 5).table == draft.table).all()
    bomb = base64.b64encode(zlib.compress(bytes((1 << MAX_BITS) + 1))).decode("ascii")
    for bad, why in [({**d, "encoding": "lzma"}, "not zlib"),
                     ({**d, "table": base64.b64encode(b"not zlib").decode("ascii")}, "not valid zlib"),
                     ({**d, "table": bomb}, "larger than any table")]:
        with pytest.raises(ValueError, match=why):
            NGramDraft.from_description(bad, 5)


def test_the_description_round_trips_and_rejects_what_does_not_fit() -> None:
    draft = build_draft(np.arange(50) % 7, vocab_size=7, context=3, bits=6)
    again = NGramDraft.from_description(json.loads(json.dumps(draft.describe())), 7)
    assert (again.table == draft.table).all() and again.context == 3 and again.bits == 6
    bad = [
        [1, 2],
        {**draft.describe(), "table": "not base64!"},
        {**draft.describe(), "bits": 5},
        {**draft.describe(), "dtype": "uint16"},
        {**draft.describe(), "context": "3"},
    ]
    for description in bad:
        with pytest.raises(ValueError):
            NGramDraft.from_description(description, 7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        NGramDraft.from_description(draft.describe(), 3)  # guesses ids 3..6 of a 3-token model


def test_a_model_with_a_malformed_draft_is_refused_in_one_line(tiny_models, tmp_path) -> None:
    proto = onnx.load(str(tiny_models.fp32))
    set_metadata(proto, {contract.META_DRAFT: json.dumps({"context": 3, "bits": 10, "table": "AAAA"})})
    path = tmp_path / "bad-draft.onnx"
    onnx.save(proto, str(path))
    assert ChargenModel.load(path).vocab_size  # loading stays fast: the table is read on first use
    done = subprocess.run([sys.executable, "-m", "chargen", "generate", "the", "-n", "5", "--model", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert "draft table is malformed" in done.stderr and "re-export" in done.stderr

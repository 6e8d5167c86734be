"""The memmap window sampler the trainer draws batches from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chargen.errors import ChargenError
from pipeline.training.batches import BatchError, WindowSampler


@pytest.fixture
def split(tmp_path):
    """A uint16 split whose token at position i is i, so windows reveal where they start."""
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def test_sample_shapes_and_shift(split):
    sampler = WindowSampler(split, "uint16", block_size=16, seed=0)
    x, y = sampler.sample(8)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    # token value == position: each row is consecutive, and y is x shifted by one
    assert (np.diff(x, axis=1) == 1).all()
    assert (y == x + 1).all()
    assert x.min() >= 0 and y.max() <= 999


def test_windows_reach_both_ends_of_the_file(tmp_path):
    path = tmp_path / "val.bin"
    np.arange(11, dtype=np.uint8).tofile(path)  # block 8: starts 0, 1, 2 only
    sampler = WindowSampler(path, np.uint8, block_size=8, seed=1)
    assert sampler.n_windows == 3
    x, y = sampler.sample(200)
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    assert y.max() == 10  # the last token is a target


def test_same_seed_same_batches_different_seed_different(split):
    a = WindowSampler(split, "uint16", 16, seed=7)
    b = WindowSampler(split, "uint16", 16, seed=7)
    c = WindowSampler(split, "uint16", 16, seed=8)
    for _ in range(3):
        xa, _ = a.sample(4)
        xb, _ = b.sample(4)
        assert (xa == xb).all()
    assert not (a.sample(16)[0] == c.sample(16)[0]).all()


def test_fixed_windows_do_not_depend_on_earlier_sampling(split):
    sampler = WindowSampler(split, "uint16", 16, seed=0)
    first = sampler.fixed_windows(20, seed=123)
    sampler.sample(50)
    again = WindowSampler(split, "uint16", 16, seed=99).fixed_windows(20, seed=123)
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()
    other = sampler.fixed_windows(20, seed=124)
    assert not (first[0] == other[0]).all()


def test_for_split_reads_the_dtype_from_meta(tmp_path):
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    sampler = WindowSampler.for_split(tmp_path, "val", block_size=4, seed=0)
    assert sampler.dtype == np.uint16 and sampler.n_tokens == 300
    with pytest.raises(ChargenError, match="split must be one of"):
        WindowSampler.for_split(tmp_path, "dev", 4, 0)
    with pytest.raises(ChargenError, match="meta.json: not found"):
        WindowSampler.for_split(tmp_path / "nowhere", "val", 4, 0)


@pytest.mark.parametrize(
    ("tokens", "dtype", "block", "message"),
    [
        (5, "uint8", 8, "too few for one window"),
        (8, "uint8", 8, "too few for one window"),
        (100, "uint32", 8, "uint8 or uint16"),
        (101, "uint8-as-uint16", 8, "whole number"),
        (100, "uint8", 0, "block_size"),
    ],
)
def test_bad_split_files_are_clear_errors(tmp_path, tokens, dtype, block, message):
    path = tmp_path / "train.bin"
    np.zeros(tokens, dtype=np.uint8).tofile(path)
    dtype = "uint16" if dtype == "uint8-as-uint16" else dtype
    with pytest.raises(BatchError, match=message):
        WindowSampler(path, dtype, block, seed=0)


def test_missing_split_file(tmp_path):
    with pytest.raises(BatchError, match="not found"):
        WindowSampler(tmp_path / "train.bin", "uint8", 8, seed=0)

"""Training batches: random windows gathered from a split file through ``np.memmap``.

The split file is never loaded whole; each call reads only the pages its windows
touch, with one vectorised gather. numpy and the standard library only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.tokens.splits import SPLIT_DTYPES, SplitError, read_meta, split_path


class BatchError(SplitError):
    """A split file cannot serve windows of the requested size."""


class WindowSampler:
    """Windows of ``block_size + 1`` tokens from one split file.

    ``sample(B)`` draws fresh random windows from the sampler's own generator
    (seeded, so a run is reproducible); ``fixed_windows(n, seed)`` returns the same
    windows for the same seed on every run, for comparable validation losses.
    """

    def __init__(self, path: str | Path, dtype: str | np.dtype, block_size: int, seed: int) -> None:
        path = Path(path)
        dtype = np.dtype(dtype)
        if dtype.name not in SPLIT_DTYPES:
            raise BatchError(f"{path}: split dtype must be uint8 or uint16, got {dtype.name}")
        if block_size < 1:
            raise BatchError(f"block_size must be >= 1, got {block_size}")
        if not path.is_file():
            raise BatchError(f"{path}: split file not found (run `dvc repro encode` first)")
        nbytes = path.stat().st_size
        if nbytes % dtype.itemsize:
            raise BatchError(
                f"{path}: {nbytes} bytes is not a whole number of {dtype.name} tokens "
                "(wrong dtype or a damaged file; run `dvc repro encode`)"
            )
        n = nbytes // dtype.itemsize
        if n < block_size + 1:
            raise BatchError(
                f"{path}: {n} tokens, too few for one window of block_size + 1 = "
                f"{block_size + 1}; use a larger corpus or a smaller model.block_size"
            )
        self.path = path
        self.dtype = dtype
        self.block_size = int(block_size)
        self.n_tokens = int(n)
        self._data = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self._rng = np.random.default_rng(seed)
        self._offsets = np.arange(self.block_size + 1, dtype=np.int64)

    @classmethod
    def for_split(cls, encoded_dir: str | Path, split: str, block_size: int, seed: int) -> WindowSampler:
        """A sampler over ``<encoded_dir>/<split>.bin``, with the dtype from ``meta.json``."""
        return cls(split_path(encoded_dir, split), read_meta(encoded_dir)["dtype"], block_size, seed)

    @property
    def n_windows(self) -> int:
        """How many distinct window start positions the split has."""
        return self.n_tokens - self.block_size

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` random windows: x and y int64 (B, block_size), y = x shifted by one."""
        starts = self._rng.integers(0, self.n_windows, size=batch_size)
        return self._gather(starts)

    def fixed_windows(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` windows that depend only on ``seed`` and the file, not on earlier calls."""
        starts = np.random.default_rng(seed).integers(0, self.n_windows, size=n)
        return self._gather(starts)

    def _gather(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # One fancy-indexed read of all windows (B, block_size + 1), then split into x/y.
        windows = np.asarray(self._data[starts[:, None] + self._offsets], dtype=np.int64)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

"""The held-out arithmetic problems of an encoded corpus, and how long training operands were.

The problems are the test split's records that are one equation each (an arithmetic
source ends every record with the end-of-text token); a corpus without any has none,
and its metrics stay as they were. numpy only: the compare stage uses it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chargen.arithmetic import Problem, parse_problem
from pipeline.tokens.splits import read_split, read_tokenizer

# Records longer than this are text, not one equation: not worth decoding to check.
_LONGEST_RECORD = 256


def heldout_problems(encoded_dir: str | Path) -> list[Problem]:
    """Every test-split record that is exactly one equation, in split order."""
    tokenizer = read_tokenizer(encoded_dir)
    ids = read_split(encoded_dir, "test")
    ends = np.flatnonzero(ids == tokenizer.eot_id)  # each record ends with end-of-text
    problems = []
    for start, end in zip(np.concatenate(([0], ends[:-1] + 1)), ends, strict=True):
        record = ids[start:end]
        if 0 < len(record) <= _LONGEST_RECORD:
            problem = parse_problem(tokenizer.decode(record))
            if problem is not None:
                problems.append(problem)
    return problems


def trained_digits(encoded_dir: str | Path) -> dict[str, int]:
    """The most digits an operand of each operation has in the training split's equations."""
    tokenizer = read_tokenizer(encoded_dir)
    most: dict[str, int] = {}
    for line in tokenizer.decode(read_split(encoded_dir, "train"), eot="\n").split("\n"):
        problem = parse_problem(line)
        if problem is not None:
            most[problem.op] = max(most.get(problem.op, 0), problem.digits[0])
    return most

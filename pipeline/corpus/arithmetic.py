"""A generated corpus of equations whose answers can be checked: ``123+456=579``, one per line.

Which split a problem belongs to is decided by a hash of its text (``123+456``), not by
where it lands in the corpus: a held-out problem can never occur in training, whatever
the seed, the number of problems or the answer format, and the plain and reversed
corpora hold out the very same problems. The generator writes one document per split:

- ``train.txt``: ``train_problems`` lines drawn from the training distribution (an
  entry of ``operations`` by weight, each operand's digit count uniformly from the
  entry's range, then the operand uniformly among the numbers of that many digits),
  repetitions included; an operation may have several entries, e.g. to train its
  longest operands more often than a single range would;
- ``val.txt``: ``val_problems`` lines drawn the same way from the validation problems;
- ``test.txt``: up to ``test_problems`` distinct test problems for every operation and
  pair of operand digit counts, plus, with ``longer_test``, operands one digit longer
  than any in training (to measure length generalisation).

Subtraction and division keep the first operand the larger (no negative answers);
division is integer (floor) division by a non-zero divisor. ``reversed`` writes the
answer least significant digit first (``123+456=975``), the order in which carries
are computed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from chargen.arithmetic import SYMBOLS
from chargen.errors import ChargenError
from pipeline.params import ArithmeticParams

# A cell with at most this many problems is enumerated rather than sampled.
ENUMERATE_LIMIT = 100_000
# Draws allowed per wanted problem before a split is declared too small to fill.
MAX_DRAWS_PER_PROBLEM = 1_000


class GeneratorError(ChargenError):
    """The generator's settings cannot produce the problems asked for."""


def split_of(problem: str, val_frac: float, test_frac: float) -> str:
    """``"test"``, ``"val"`` or ``"train"`` for a problem's text, by its sha256."""
    u = int.from_bytes(hashlib.sha256(problem.encode("ascii")).digest()[:8], "big") / 2.0**64
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def solve(a: int, op: str, b: int) -> int:
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    return a // b


def equation(a: int, op: str, b: int, answer: str) -> tuple[str, str]:
    """(problem, line): ``"123+456"`` and ``"123+456=579"`` (or ``=975`` reversed)."""
    problem = f"{a}{SYMBOLS[op]}{b}"
    result = str(solve(a, op, b))
    return problem, f"{problem}={result[::-1] if answer == 'reversed' else result}"


def numbers(digits: int, nonzero: bool = False) -> range:
    """The numbers of ``digits`` digits (one digit: 0-9, or 1-9 when zero is not allowed)."""
    if digits == 1:
        return range(1 if nonzero else 0, 10)
    return range(10 ** (digits - 1), 10**digits)


def draw(rng: random.Random, op: str, da: int, db: int) -> tuple[int, int]:
    """Operands of ``da`` and ``db`` digits; sub and div put the larger first, div never has a zero."""
    a, b = rng.choice(numbers(da, op == "div")), rng.choice(numbers(db, op == "div"))
    return (max(a, b), min(a, b)) if op in ("sub", "div") else (a, b)


def _draw_training(rng: random.Random, spec: ArithmeticParams, weights: list[float]) -> tuple[int, str, int]:
    o = rng.choices(spec.operations, weights)[0]
    lo, hi = o.digits
    a, b = draw(rng, o.op, rng.randint(lo, hi), rng.randint(lo, hi))
    return a, o.op, b


def distribution_lines(spec: ArithmeticParams, split: str, count: int, rng: random.Random) -> list[str]:
    """``count`` lines drawn from the training distribution among the problems of ``split``."""
    weights = [o.weight for o in spec.operations]
    lines: list[str] = []
    for _ in range(MAX_DRAWS_PER_PROBLEM * count):
        a, op, b = _draw_training(rng, spec, weights)
        problem, line = equation(a, op, b, spec.answer)
        if split_of(problem, spec.val_frac, spec.test_frac) == split:
            lines.append(line)
            if len(lines) == count:
                return lines
    raise GeneratorError(
        f"download.sources.arithmetic: the {split} split holds too few of the possible problems "
        f"to draw {count}; widen the operations' digits or raise {split}_frac"
    )


def heldout_cells(spec: ArithmeticParams) -> list[tuple[str, int, int]]:
    """(op, more digits, fewer digits) of every cell the test document covers: each pair of
    digit counts an operation trains on, and with ``longer_test`` one digit more than its longest."""
    cells: dict[tuple[str, int, int], None] = {}
    for o in spec.operations:
        lo, hi = o.digits
        cells.update(((o.op, da, db), None) for da in range(lo, hi + 1) for db in range(lo, da + 1))
    longest: dict[str, int] = {}
    for o in spec.operations:
        longest[o.op] = max(longest.get(o.op, 0), o.digits[1])
    order = sorted(cells, key=lambda c: (list(longest).index(c[0]), c[1], c[2]))
    return order + ([(op, n + 1, n + 1) for op, n in longest.items()] if spec.longer_test else [])


def _enumerate(op: str, da: int, db: int) -> Iterator[tuple[int, int]]:
    """Every problem of a cell: both operand orders, except that sub and div put the larger first."""
    orders = [(da, db)] if da == db else [(da, db), (db, da)]
    for x, y in orders:
        for a in numbers(x, op == "div"):
            for b in numbers(y, op == "div"):
                if op not in ("sub", "div") or a >= b:
                    yield a, b


def cell_lines(spec: ArithmeticParams, op: str, da: int, db: int, rng: random.Random) -> list[str]:
    """Up to ``spec.test_problems`` distinct test problems of one cell, in random order."""
    want = spec.test_problems
    found: dict[str, str] = {}
    if len(numbers(da)) * len(numbers(db)) <= ENUMERATE_LIMIT:
        for a, b in _enumerate(op, da, db):
            problem, line = equation(a, op, b, spec.answer)
            if split_of(problem, spec.val_frac, spec.test_frac) == "test":
                found[problem] = line
        lines = sorted(found.values())
        rng.shuffle(lines)
        return lines[:want]
    # A large cell: sample, keeping distinct test problems (the bound ends a hopeless search).
    for _ in range(MAX_DRAWS_PER_PROBLEM * want):
        a, b = draw(rng, op, *((da, db) if rng.random() < 0.5 else (db, da)))
        problem, line = equation(a, op, b, spec.answer)
        if problem not in found and split_of(problem, spec.val_frac, spec.test_frac) == "test":
            found[problem] = line
            if len(found) == want:
                break
    return list(found.values())


def generate(spec: ArithmeticParams) -> dict[str, str]:
    """The three documents, ``{"train": text, "val": text, "test": text}``, one equation
    per line (each line ends with ``\\n``); the same spec always gives the same text."""
    rng = random.Random(spec.seed)
    docs = {
        "train": distribution_lines(spec, "train", spec.train_problems, rng),
        "val": distribution_lines(spec, "val", spec.val_problems, rng),
        "test": [line for op, da, db in heldout_cells(spec) for line in cell_lines(spec, op, da, db, rng)],
    }
    return {split: "".join(line + "\n" for line in lines) for split, lines in docs.items()}


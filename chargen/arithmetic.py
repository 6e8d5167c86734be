"""Equations with checkable answers: how a held-out problem is read, answered and judged.

A problem is one record of an arithmetic corpus, ``123+456=579``: the prompt is the
text up to and including ``=``, the reference answer what follows (in the corpus's own
format, plain or reversed). A problem is asked as a new record — the end-of-text token,
then the prompt, as ``chargen generate PROMPT --new-document`` asks it — because a model
trained on random windows of the record stream reads a bare prompt as possibly the cut
end of a longer one. A model's answer is what it writes after the prompt, up to its
end-of-text token, decoding greedily (top-k 1). It counts as right only when it equals
the reference exactly: an answer with another digit, a missing or extra digit, any
other character, or no end-of-text token at all is wrong.

Accuracy is reported per operation and per *cell* — the operands' digit counts, the
larger first (``3x2``: a 3-digit and a 2-digit operand) — and the cells with an
operand longer than any seen in training are kept apart (length generalisation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from chargen.tokenizers import Tokenizer

SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_OPS = {symbol: op for op, symbol in SYMBOLS.items()}
EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "123+45="
    answer: str  # the reference, as the corpus writes it: "168" (or "861" reversed)
    op: str  # "add", "sub", "mul" or "div"
    digits: tuple[int, int]  # the operands' digit counts, the larger first

    @property
    def cell(self) -> str:
        return cell_name(*self.digits)


def cell_name(da: int, db: int) -> str:
    """``"3x2"`` for operands of 3 and 2 digits (in either order)."""
    return f"{max(da, db)}x{min(da, db)}"


def parse_problem(record: str) -> Problem | None:
    """The problem a record states, or None when the record is not one equation."""
    m = EQUATION.fullmatch(record)
    if m is None:
        return None
    a, symbol, b, answer = m.groups()
    digits = (max(len(a), len(b)), min(len(a), len(b)))
    return Problem(f"{a}{symbol}{b}=", answer, _OPS[symbol], digits)


def prompt_ids(problem: Problem, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids (T,) a problem is asked with: end-of-text, then the prompt."""
    return np.concatenate(([tokenizer.eot_id], tokenizer.encode(problem.prompt))).astype(np.int64)


def answer_text(ids: Sequence[int], tokenizer: Tokenizer) -> str | None:
    """What generated ``ids`` answer: the text before the first end-of-text token, or
    None when there is none (the answer never ended)."""
    ids = list(ids)
    if tokenizer.eot_id not in ids:
        return None
    return tokenizer.decode(ids[: ids.index(tokenizer.eot_id)])


def is_correct(answer: str | None, reference: str) -> bool:
    """Exact match: malformed or unfinished answers (None) are wrong."""
    return answer is not None and answer == reference


def answer_budget(problems: Sequence[Problem]) -> int:
    """Tokens to generate so that every answer is judged: the longest reference and its end."""
    return max(len(p.answer) for p in problems) + 1


def by_prompt_length(problems: Sequence[Problem]) -> dict[int, list[int]]:
    """Indices of ``problems`` grouped by prompt length: a group decodes as one batch."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(len(p.prompt), []).append(i)
    return groups


def accuracy_report(
    problems: Sequence[Problem], answers: Sequence[str | None], trained_digits: dict[str, int]
) -> dict[str, Any]:
    """Exact-match accuracy overall, per operation and per cell, and the number of problems.

    ``trained_digits[op]`` is the most digits an operand of ``op`` had in training: cells
    beyond it count towards ``accuracy_longer``, not ``accuracy``. Keys: ``accuracy``,
    ``accuracy_longer`` (None without such cells), ``problems``, ``problems_longer`` and, per
    operation, ``{"accuracy", "<cell>": accuracy, ...}`` plus ``counts`` of every cell.
    """
    right: dict[tuple[str, tuple[int, int]], int] = {}
    total: dict[tuple[str, tuple[int, int]], int] = {}
    for p, a in zip(problems, answers, strict=True):
        key = (p.op, p.digits)
        total[key] = total.get(key, 0) + 1
        right[key] = right.get(key, 0) + is_correct(a, p.answer)

    def longer(key: tuple[str, tuple[int, int]]) -> bool:
        return key[1][0] > trained_digits.get(key[0], 0)

    def share(keys: list[tuple[str, tuple[int, int]]]) -> float | None:
        n = sum(total[k] for k in keys)
        return sum(right[k] for k in keys) / n if n else None

    order = sorted(total, key=lambda k: (list(SYMBOLS).index(k[0]), k[1]))
    seen = [k for k in order if not longer(k)]
    report: dict[str, Any] = {
        "accuracy": share(seen),
        "accuracy_longer": share([k for k in order if longer(k)]),
        "problems": sum(total[k] for k in seen),
        "problems_longer": sum(total[k] for k in order if longer(k)),
    }
    ops = list(dict.fromkeys(k[0] for k in order))
    for op in ops:
        cells = [k for k in order if k[0] == op]
        report[op] = {"accuracy": share([k for k in cells if not longer(k)])}
        report[op].update({cell_name(*k[1]): right[k] / total[k] for k in cells})
    report["counts"] = {op: {cell_name(*k[1]): total[k] for k in order if k[0] == op} for op in ops}
    return report


def describe(report: dict[str, Any]) -> str:
    """One line of an accuracy report: ``"arithmetic accuracy 97.1% (one digit longer: 3.0%)"``."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    line = f"arithmetic accuracy {pct(report['accuracy'])}"
    return line + (f" (one digit longer: {pct(report['accuracy_longer'])})" if report["problems_longer"] else "")

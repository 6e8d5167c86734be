"""Where an arithmetic model fails: accuracy by carries and by answer digit, per cell.

Answers every held-out problem of ``--encoded`` with the exported model ``--model``
greedily (top-k 1, through the chargen runtime, as the compare stage does) and prints
one JSON object with, for each operation and cell (operand digit counts):

- ``accuracy`` and ``problems``;
- ``by_carries``: accuracy by how many carries an addition makes (borrows for a
  subtraction; multiplication and division have none of their own: not shown);
- ``digit_accuracy``: for each digit of the answer counted from the least significant
  (``"1"`` the units), the share of answers with that digit right, aligned by place
  value whatever the answer format (a missing digit is wrong);
- ``wrong_examples``: a few wrong answers, problem and reference as in the corpus.

The answer format (plain or reversed) is read off the problems themselves. The model and
the corpus default to the recipe's (``--params``: its export.model_dir and encode.out_dir).
E.g. from the repository root, after ``make repro-arithmetic``:
    python -m benchmarks.arithmetic
    python -m benchmarks.arithmetic --precision int8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chargen.arithmetic import EQUATION, Problem, is_correct
from chargen.contract import PRECISIONS, model_path
from chargen.errors import ChargenError
from chargen.model import ChargenModel
from pipeline.corpus.arithmetic import solve
from pipeline.evaluation.arithmetic import heldout_problems
from pipeline.evaluation.compare import greedy_answers
from pipeline.params import load_params
from pipeline.stage import run_stage

RECIPE = Path("recipes/arithmetic/params.yaml")


def operands(p: Problem) -> tuple[int, int]:
    a, _, b = EQUATION.fullmatch(p.prompt + p.answer).groups()[:3]
    return int(a), int(b)


def carries(p: Problem) -> int | None:
    """Carries of an addition, borrows of a subtraction, digit by digit; None otherwise."""
    if p.op not in ("add", "sub"):
        return None
    a, b = operands(p)
    count = carry = 0
    while a or b:
        d = (a % 10 + b % 10 + carry) if p.op == "add" else (a % 10 - b % 10 - carry)
        carry = int(d >= 10) if p.op == "add" else int(d < 0)
        count += carry
        a, b = a // 10, b // 10
    return count


def reversed_format(problems: list[Problem]) -> bool:
    """Whether the answers are written least significant digit first (by majority)."""
    votes = 0
    for p in problems:
        a, b = operands(p)
        result = str(solve(a, p.op, b))
        votes += (p.answer == result[::-1]) - (p.answer == result)
    return votes > 0


def digits_from_units(text: str | None, reverse: bool) -> str:
    """An answer's digits, least significant first ("" for no answer)."""
    if text is None:
        return ""
    return text if reverse else text[::-1]


def cell_analysis(problems: list[Problem], answers: list[str | None], reverse: bool) -> dict:
    right = [is_correct(a, p.answer) for p, a in zip(problems, answers, strict=True)]
    by_carries: dict[int, list[bool]] = {}
    for p, ok in zip(problems, right, strict=True):
        c = carries(p)
        if c is not None:
            by_carries.setdefault(c, []).append(ok)
    width = max(len(p.answer) for p in problems)
    digit_accuracy = {}
    for i in range(width):
        hits = [digits_from_units(a, reverse)[i : i + 1] == digits_from_units(p.answer, reverse)[i : i + 1]
                for p, a in zip(problems, answers, strict=True) if len(p.answer) > i]
        digit_accuracy[str(i + 1)] = sum(hits) / len(hits)
    wrong = [f"{p.prompt}{a if a is not None else '(no end)'} (reference {p.answer})"
             for p, a, ok in zip(problems, answers, right, strict=True) if not ok]
    return {
        "accuracy": sum(right) / len(right),
        "problems": len(right),
        "by_carries": {str(c): {"accuracy": sum(v) / len(v), "problems": len(v)} for c, v in sorted(by_carries.items())},
        "digit_accuracy": digit_accuracy,
        "wrong_examples": wrong[:5],
    }


def analyse(model: ChargenModel, problems: list[Problem]) -> dict:
    answers = greedy_answers(model, problems)
    reverse = reversed_format(problems)
    cells: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(problems):
        cells.setdefault((p.op, p.cell), []).append(i)
    result: dict = {"answer": "reversed" if reverse else "plain", "model": model.precision}
    for (op, cell), idx in sorted(cells.items(), key=lambda kv: (kv[0][0], [int(d) for d in kv[0][1].split("x")])):
        result.setdefault(op, {})[cell] = cell_analysis([problems[i] for i in idx], [answers[i] for i in idx], reverse)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(RECIPE), help=f"the recipe's params file (default: {RECIPE})")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="which of its models")
    parser.add_argument("--model", help="an exported model file instead")
    parser.add_argument("--encoded", help="an encoded corpus with held-out problems instead")
    a = parser.parse_args()
    p = load_params(a.params)
    model = Path(a.model or model_path(a.precision, p.export.model_dir))
    encoded = a.encoded or p.encode.out_dir
    if not model.exists():
        raise ChargenError(f"{model} does not exist; run `make repro-arithmetic` first")
    problems = heldout_problems(encoded)
    if not problems:
        raise ChargenError(f"{encoded} holds no held-out equations; point --encoded at an arithmetic corpus")
    print(json.dumps(analyse(ChargenModel.load(model), problems), indent=2))


if __name__ == "__main__":
    run_stage(main)

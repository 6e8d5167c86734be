"""The default recipe against the previous one on a corpus of another kind, at equal training time.

The corpus is Django's documentation (reStructuredText prose about code), from its
source distribution on the package index. On the default corpus, with 2 threads,
the previous default (4 layers x 192 wide, 6 heads, AdamW, no n-gram tables) trains
1,700 steps and the current one (params.yaml) 3,700 steps in the same ~9.5 minutes,
so each runs those step counts here. Each recipe goes through benchmarks/recipe.py's
download -> encode -> train -> evaluate; prints one JSON object, e.g.
    python -m benchmarks.second_corpus
Overrides given after the options apply to both recipes (a quick check of the plumbing:
``--members 'Django-5.1.4/docs/topics/*.txt' train.max_steps=20``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.recipe import apply_overrides, run_recipe
from pipeline.params import read_yaml_mapping
from pipeline.stage import run_stage

DJANGO_DOCS = {
    "name": "django-docs",
    "index": "Django==5.1.4",
    "sha256": "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
}
# `*` stays within one directory: the .txt pages one level under docs/ (about 2.9 MB).
DEFAULT_MEMBERS = "Django-5.1.4/docs/*/*.txt"

# Steps each recipe trains in the same time on the default corpus (2 threads, bfloat16).
RECIPES: dict[str, list[str]] = {
    "previous_default": [
        "model.n_head=6", "model.n_embd=192", "model.bigram=false", "model.trigram_buckets=0",
        "train.optimizer=adamw", "train.max_steps=1700",
    ],
    "default": ["train.max_steps=3700"],
}


def compare(raw: dict[str, Any], members: str, extra: list[str]) -> dict[str, Any]:
    """Both recipes on the corpus; ``extra`` overrides apply to both."""
    raw = dict(raw, download={**raw["download"], "sources": [{**DJANGO_DOCS, "members": members}]})
    results = {}
    for name, overrides in RECIPES.items():
        recipe = apply_overrides(raw, overrides + extra)
        with tempfile.TemporaryDirectory(prefix=f"chargen-{name}-") as tmp:
            results[name] = {"overrides": overrides + extra, **run_recipe(recipe, Path(tmp))}
    new, old = results["default"], results["previous_default"]
    return {
        "corpus": f"{DJANGO_DOCS['index']} {members}",
        "recipes": results,
        "test_loss_gain": round(old["test_loss"] - new["test_loss"], 4),
        "default_wins": new["test_loss"] < old["test_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="base params file (default: params.yaml)")
    ap.add_argument("--members", default=DEFAULT_MEMBERS, help=f"archive members glob (default: {DEFAULT_MEMBERS})")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to both recipes")
    a = ap.parse_args()
    raw = read_yaml_mapping(Path(a.params))
    apply_overrides(raw, a.overrides)  # a bad override is reported now, not after the first recipe trained
    print(json.dumps(compare(raw, a.members, a.overrides)))


if __name__ == "__main__":
    run_stage(main)

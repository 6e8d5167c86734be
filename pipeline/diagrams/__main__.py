"""Regenerate the diagrams in the docs: ``python -m pipeline.diagrams`` (``--check``: only
report which files are stale, exit 1 if any).

The pipeline comes from dvc.yaml, the model from params.yaml's ``model`` section; the
vocabulary size, which the corpus decides, is the tokenizer's in the committed fp32 model
file, so the picture regenerates the same on any checkout without running the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chargen.contract import PRECISIONS, model_path
from chargen.errors import ChargenError
from chargen.model import ChargenModel
from pipeline.diagrams.markdown import Diagram, fill
from pipeline.diagrams.model_graph import model_diagram
from pipeline.diagrams.pipeline_graph import pipeline_diagram
from pipeline.files import write_text
from pipeline.model import GPTConfig
from pipeline.params import load_params
from pipeline.stage import run_stage

DOCUMENTS = ("README.md", "docs/architecture.md")


def diagrams(root: Path) -> dict[str, Diagram]:
    params = load_params(root / "params.yaml")
    model_file = root / model_path(PRECISIONS[0], params.export.model_dir)
    if not model_file.is_file():
        raise ChargenError(
            f"{model_file}: not found; the model diagram takes the vocabulary size from its "
            "tokenizer: run `dvc repro` (or check the file out)"
        )
    vocab_size = ChargenModel.load(model_file).tokenizer.size
    found = [pipeline_diagram(root), model_diagram(GPTConfig.from_params(params.model, vocab_size))]
    return {d.name: d for d in found}


def regenerated(root: Path) -> dict[Path, str]:
    """Each document's text with its diagrams regenerated."""
    found = diagrams(root)
    return {root / doc: fill((root / doc).read_text(encoding="utf-8"), found, doc) for doc in DOCUMENTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a diagram is stale")
    root = Path()
    check = parser.parse_args().check
    texts = regenerated(root)
    stale = [path for path, text in texts.items() if path.read_text(encoding="utf-8") != text]
    for path in stale:
        if not check:
            write_text(path, texts[path])
        print(f"{path.relative_to(root)}: {'stale' if check else 'rewritten'}")
    if check and stale:
        raise SystemExit(1)


if __name__ == "__main__":
    run_stage(main)

"""The docs' diagrams: the committed ones are what `python -m pipeline.diagrams` draws from
dvc.yaml and params.yaml, the model diagram follows the config, a changed pipeline is caught."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dvcproject import dvc_env, make_dvc_project

from chargen.errors import ChargenError
from pipeline.diagrams.__main__ import DOCUMENTS, diagrams, regenerated
from pipeline.diagrams.__main__ import main as diagrams_main
from pipeline.diagrams.markdown import names
from pipeline.diagrams.model_graph import model_diagram
from pipeline.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def test_committed_diagrams_are_current() -> None:
    for path, text in regenerated(REPO).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} has a stale diagram: run `python -m pipeline.diagrams` and commit it"
        )
    for doc in DOCUMENTS:  # both documents show both diagrams
        assert sorted(names((REPO / doc).read_text(encoding="utf-8"))) == ["model", "pipeline"], doc


def test_model_diagram_follows_the_config() -> None:
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=48, dropout=0.0, bias=True,
                    pos_encoding="learned", mlp="swiglu", qk_norm=True, tie_weights=False, vocab_size=70,
                    bigram=False, trigram_buckets=0, logit_cap=0.0)
    d = model_diagram(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    assert f"{model.num_params():,} parameters" in d.caption and "vocabulary of 70 tokens" in d.caption
    hidden = model.blocks[0].mlp.proj.in_features
    for label in ("3 × Block", "token embedding wte<br/>70 × 64", "position embedding wpe<br/>48 × 64",
                  "qkv: Linear 64 → 192, bias", "q, k, v (B, 4, T, 16) each", "LayerNorm 16 on q and k",
                  f"fc: Linear 64 → {2 * hidden}, bias", f"SiLU(a) · b (B, T, {hidden})",
                  "lm_head: Linear 64 → 70\"", "(B, 4, S, 16)", "cache_index (B,) int64", "logits (B, T, 70)"):
        assert label in d.mermaid, label
    assert "rotary" not in d.mermaid and "tied" not in d.mermaid
    assert "prev_ids" not in d.mermaid and "tanh" not in d.mermaid


def test_model_diagram_draws_the_ngram_tables_and_the_logit_cap() -> None:
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0, bias=False,
                    pos_encoding="rope", mlp="relu2", qk_norm=False, tie_weights=True, vocab_size=10,
                    bigram=True, trigram_buckets=61, logit_cap=15.0)
    d = model_diagram(cfg).mermaid
    for label in ("prev_ids (B, 2) int64", "bigram (previous, current): 110 × 32",
                  "hashed trigram: 61 buckets × 32", "then 15 · tanh(logits / 15)", "tied: the same matrix as wte"):
        assert label in d, label


def test_a_changed_pipeline_makes_the_docs_stale_until_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    repo = make_dvc_project(tmp_path / "project", {"a.txt": "text\n"})
    for doc in (*DOCUMENTS, "models/model.fp32.onnx"):
        (repo / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / doc, repo / doc)
    assert all(p.read_text(encoding="utf-8") == t for p, t in regenerated(repo).items())  # corpus: not drawn
    extra = "  summary:\n    cmd: python -m stages.summary\n    deps:\n      - ${report.out}\n" \
            "    outs:\n      - reports/summary.md\n"
    with (repo / "dvc.yaml").open("a", encoding="utf-8") as f:
        f.write("\n" + extra)

    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["pipeline.diagrams", "--check"])
    with pytest.raises(SystemExit) as stale:
        diagrams_main()
    assert stale.value.code == 1
    assert capsys.readouterr().out.split() == ["README.md:", "stale", "docs/architecture.md:", "stale"]
    assert (repo / "README.md").read_bytes() == (REPO / "README.md").read_bytes()  # --check writes nothing
    done = subprocess.run([sys.executable, "-m", "pipeline.diagrams"], cwd=repo, env=dvc_env(repo),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["README.md:", "rewritten", "docs/architecture.md:",
                                                             "rewritten"]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    summary = re.search(r'(s\d+)\(\["summary"\]\)', readme).group(1)
    assert '["reports/summary.md"]:::data' in readme and f"--> {summary}" in readme
    assert all(p.read_text(encoding="utf-8") == t for p, t in regenerated(repo).items())


def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    repo = make_dvc_project(tmp_path / "project", {"a.txt": "text\n"})
    with pytest.raises(ChargenError, match=r"models/model.fp32.onnx: not found; .* run `dvc repro`"):
        diagrams(repo)

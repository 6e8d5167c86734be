"""Distributed data parallel: two CPU processes (gloo) under torchrun end with identical weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import stage_env
from test_train import make_project

from pipeline.model import GPT, GPTConfig
from pipeline.training.checkpoint import load_checkpoint

# Each rank trains through the same library call as the stage and saves what it holds.
WORKER = """
import torch
from pipeline.params import load_params
from pipeline.training.train import train

params = load_params("params.yaml")
result = train(params.model, params.train, params.encode.out_dir, progress=False)
torch.save(result["model"].state_dict(), f"rank{result['rank']}.pt")
"""


def test_two_gloo_ranks_hold_identical_weights(tmp_path: Path) -> None:
    project = make_project(tmp_path, max_steps=12, eval_interval=6, checkpoint_interval=6)
    (project / "worker.py").write_text(WORKER, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "worker.py"],
        cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rank0 = torch.load(project / "rank0.pt", weights_only=True)
    rank1 = torch.load(project / "rank1.pt", weights_only=True)
    last = load_checkpoint(project / "checkpoints" / "last.pt")
    assert last["step"] == 12
    assert last["tokens_seen"] == 12 * 8 * 32 * 2  # steps x batch x block x ranks
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"ranks disagree on {k}"
        assert torch.equal(rank0[k], last["model"][k])
    torch.manual_seed(1337)  # the training seed: rebuild the initial weights
    init = GPT(GPTConfig(**last["model_config"])).state_dict()
    assert any(not torch.equal(init[k], rank0[k]) for k in rank0), "training did not move the weights"

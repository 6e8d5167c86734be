"""Fine-tuning from a trained checkpoint: faster than from scratch, vocabulary kept or extended,
LoRA merged exactly, clean errors for bad bases, the base a DVC dependency, resume after kill."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_METRICS, TINY_TEXT, project_params, tiny_tokenizer, write_encoded
from dvcproject import dvc, make_dvc_project
from test_train import TINY_MODEL, TINY_TRAIN, kill_once_checkpointed, run_train

from chargen.tokenizers import CharTokenizer
from pipeline.export.model_file import export_onnx
from pipeline.model import GPT, GPTConfig
from pipeline.params import FinetuneParams, ModelParams, TrainParams
from pipeline.training.checkpoint import load_checkpoint, load_model
from pipeline.training.finetune import (
    FinetuneError,
    base_model,
    finetune_tokenizer,
    initial_model,
    load_base,
)
from pipeline.training.lora import LoRALinear, add_adapters, merge_adapters
from pipeline.training.train import train

# A second corpus in another style: letters, capitalised, with characters the base never saw.
LETTER_TEXT = (
    "Dear Anna, the cat sat on the mat and the dog ran to the sun. Yours, Tom.\n"
    "Dear Tom, is the dog on the log? The sun is hot; the cat is on the mat. Anna.\n"
) * 8
BASE_MODEL = {**TINY_MODEL, "trigram_buckets": 0}  # bigram only, so the vocabulary may grow
FT_TRAIN = {**TINY_TRAIN, "eval_interval": 10, "checkpoint_interval": 10, "optimizer": "adamw"}


def finetune_params(init_from: str = "", **kw: object) -> FinetuneParams:
    base_dir = str(Path(init_from).parent) if init_from else "base"
    return FinetuneParams(**{**project_params()["finetune"], "base_dir": base_dir, "init_from": init_from,
                             "max_steps": 30, "eval_interval": 10, "lr": 3e-3, "min_lr": 3e-4,
                             "warmup_steps": 3, "patience": 0, **kw})


def model_params(**kw: object) -> ModelParams:
    return ModelParams(**{**project_params()["model"], **BASE_MODEL, **kw})


def train_params(root: Path, **kw: object) -> TrainParams:
    return TrainParams(**{**project_params()["train"], **FT_TRAIN, "out_dir": str(root / "checkpoints"),
                          "live_dir": str(root / "dvclive"), **kw})


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on TINY_TEXT by the real training loop: the base to fine-tune."""
    root = tmp_path_factory.mktemp("base")
    write_encoded(root / "encoded", tiny_tokenizer())
    train(model_params(), train_params(root, max_steps=60, lr=1e-2, min_lr=1e-3), root / "encoded", progress=False)
    path = root / "base" / "base.pt"
    path.parent.mkdir()
    shutil.copy(root / "checkpoints" / "best.pt", path)
    return path


def letters_encoded(root: Path, base: Path, new_chars: str) -> CharTokenizer:
    counts = np.bincount(np.frombuffer(LETTER_TEXT.encode("utf-32-le"), dtype="<u4"), minlength=256)
    tokenizer = finetune_tokenizer(load_base(base), counts, new_chars, normalize_nfc=True)
    write_encoded(root / "encoded", tokenizer, LETTER_TEXT)
    return tokenizer


def test_finetuning_beats_training_from_scratch_at_equal_steps(tmp_path: Path, base_ckpt: Path) -> None:
    letters_encoded(tmp_path, base_ckpt, "extend")
    # The same rate and schedule for all: only the starting point differs.
    steps = {"max_steps": 12, "eval_interval": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3}
    scratch = train(model_params(), train_params(tmp_path / "scratch", **steps), tmp_path / "encoded",
                    progress=False)
    results = {}
    for method in ("full", "freeze", "lora"):
        f = finetune_params(str(base_ckpt), method=method, new_chars="extend", freeze_layers=1, **steps)
        results[method] = train(model_params(), train_params(tmp_path / method), tmp_path / "encoded", f,
                                progress=False)
    assert results["full"]["step"] == scratch["step"] == 12
    assert results["full"]["best_val_loss"] < scratch["best_val_loss"] - 0.3
    assert results["lora"]["best_val_loss"] < scratch["best_val_loss"]
    assert results["lora"]["trainable_params"] < results["freeze"]["trainable_params"] \
        < results["full"]["trainable_params"]
    # What is written is a plain model that records where it came from.
    model, tokenizer, info = load_model(tmp_path / "lora" / "checkpoints" / "best.pt")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert info["origin"]["init_from"] == base_ckpt.as_posix() and info["origin"]["method"] == "lora"
    assert info["origin"]["added_chars"] == "".join(tokenizer.tokens[load_base(base_ckpt).tokenizer.size:])


def test_unknown_characters_are_listed_and_mapped_or_added(tmp_path: Path, base_ckpt: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = load_base(base_ckpt)
    kept = letters_encoded(tmp_path / "unk", base_ckpt, "unk")
    warning = capsys.readouterr().err
    assert "the base model lacks 5 characters" in warning and "'ADTY;'" not in warning
    assert all(c in warning for c in "ADTY;") and "unknown token" in warning
    assert kept == base.tokenizer
    assert (kept.encode("Dear") == [kept.unk_id, *kept.encode("ear")]).all()

    grown = letters_encoded(tmp_path / "ext", base_ckpt, "extend")
    assert grown.tokens[: base.tokenizer.size] == base.tokenizer.tokens
    assert sorted(grown.tokens[base.tokenizer.size:]) == sorted(set(LETTER_TEXT) - set(TINY_TEXT))
    # The grown model computes the same logits as the base for text of old characters ...
    old = base_model(base, base.config)
    new = base_model(base, GPTConfig(**{**base.config.to_dict(), "vocab_size": grown.size}))
    ids = torch.from_numpy(base.tokenizer.encode(TINY_TEXT[:32])).unsqueeze(0)  # (1, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(ids)[0][..., : base.tokenizer.size], old(ids)[0])
        # ... and a new character starts at the mean of the trained embeddings.
        torch.testing.assert_close(new.wte.weight[-1], old.wte.weight.mean(0))


def test_extension_is_refused_for_a_hashed_trigram_table(tmp_path: Path) -> None:
    root = tmp_path / "tri"
    write_encoded(root / "encoded", tiny_tokenizer())
    train(model_params(trigram_buckets=61), train_params(root, max_steps=2), root / "encoded", progress=False)
    counts = np.bincount(np.frombuffer(LETTER_TEXT.encode("utf-32-le"), dtype="<u4"), minlength=256)
    with pytest.raises(FinetuneError, match="cannot grow .* hashed trigram table.*new_chars: unk"):
        finetune_tokenizer(load_base(root / "checkpoints" / "best.pt"), counts, "extend", normalize_nfc=True)


def test_merged_adapters_give_the_adapted_logits_and_export(tmp_path: Path, base_ckpt: Path) -> None:
    base = load_base(base_ckpt)
    torch.manual_seed(0)
    model = initial_model(base, base.config, finetune_params(str(base_ckpt), method="lora", lora_rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)  # a trained adapter is not zero
    merged = merge_adapters(model.eval())
    assert type(merged.blocks[0].attn.qkv) is torch.nn.Linear
    ids = torch.from_numpy(base.tokenizer.encode(TINY_TEXT[:32])).unsqueeze(0)
    with torch.no_grad():
        adapted, plain, before = model(ids)[0], merged(ids)[0], base_model(base, base.config)(ids)[0]
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - before).abs().max() > 1e-3  # the adapters did change the model
    export_onnx(merged, base.tokenizer, tmp_path / "model.fp32.onnx", TINY_METRICS)  # parity checked inside


def test_adapters_are_added_to_every_block_matrix() -> None:
    cfg = GPTConfig(**{**project_params()["model"], **BASE_MODEL, "vocab_size": 20})
    model = add_adapters(GPT(cfg), rank=2, alpha=4)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * cfg.n_layer


# ----------------------------------------------------------------------------- the stage


def stage_project(root: Path, base_ckpt: Path, **finetune: object) -> Path:
    """A project whose params fine-tune base/base.pt on the letters, encoded for it."""
    (root / "base").mkdir(parents=True)
    shutil.copy(base_ckpt, root / "base" / "base.pt")
    letters_encoded(root / "data", base_ckpt, "unk")
    params = project_params()
    params["model"].update(BASE_MODEL)
    params["train"].update(FT_TRAIN)
    params["finetune"].update({"init_from": "base/base.pt", "max_steps": 20, "eval_interval": 10,
                               "warmup_steps": 2, "patience": 0, **finetune})
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("problem", ["missing", "corrupt", "architecture", "tokenizer"])
def test_bad_bases_are_one_line_errors_and_overwrite_nothing(tmp_path: Path, base_ckpt: Path, problem: str) -> None:
    project = stage_project(tmp_path, base_ckpt)
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "best.pt").write_bytes(b"the previous run's model")
    base = project / "base" / "base.pt"
    expected = {
        "missing": "base/base.pt not found",
        "corrupt": "corrupt or not a chargen checkpoint",
        "architecture": "n_layer=2 but params.yaml asks for n_layer=3",
        "tokenizer": "was not encoded with base/base.pt's tokenizer; re-run the encode stage",
    }[problem]
    if problem == "missing":
        base.unlink()
    elif problem == "corrupt":
        base.write_bytes(b"\x00garbage")
    elif problem == "architecture":
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["model"]["n_layer"] = 3
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    else:
        write_encoded(project / "data" / "encoded", CharTokenizer(["<eot>", "<unk>", *sorted(set(LETTER_TEXT))]),
                      LETTER_TEXT)
    assert expected in one_line_error(run_train(project))
    assert (project / "checkpoints" / "best.pt").read_bytes() == b"the previous run's model"
    assert not (project / "checkpoints" / "last.pt").exists()


def test_a_lora_run_resumes_after_kill_like_an_uninterrupted_one(tmp_path: Path, base_ckpt: Path) -> None:
    settings = {"method": "lora", "max_steps": 120, "eval_interval": 60}
    straight = stage_project(tmp_path / "straight", base_ckpt, **settings)
    assert run_train(straight).returncode == 0
    killed = stage_project(tmp_path / "killed", base_ckpt, **settings)
    saved_step = kill_once_checkpointed(killed, settings["max_steps"])
    r = run_train(killed)
    assert r.returncode == 0 and f"resuming from checkpoints/last.pt at step {saved_step}/120" in r.stdout
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (straight, killed))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def test_early_stopping_ends_the_run(tmp_path: Path, base_ckpt: Path) -> None:
    # A rate this high makes the loss jump about: validations soon stop improving.
    project = stage_project(tmp_path, base_ckpt, method="full", lr=0.5, min_lr=0.5, muon_lr=0.5,
                            max_steps=100, eval_interval=5, patience=2)
    r = run_train(project)
    assert r.returncode == 0, r.stderr
    assert "stopping early" in r.stdout
    stopped = load_checkpoint(project / "checkpoints" / "last.pt")["step"]
    assert stopped < 100
    assert load_checkpoint(project / "checkpoints" / "best.pt")["step"] == stopped - 2 * 5
    again = run_train(project)  # a stopped run stays stopped
    assert again.returncode == 0 and f"at step {stopped}/100" in again.stdout
    assert load_checkpoint(project / "checkpoints" / "last.pt")["step"] == stopped


# ----------------------------------------------------------------------------- under DVC


def test_the_base_checkpoint_is_a_dvc_dependency(tmp_path: Path) -> None:
    def tiny(params: dict) -> None:
        params["model"].update(BASE_MODEL)
        params["train"].update({**FT_TRAIN, "max_steps": 10})
        params["finetune"].update({"max_steps": 10, "eval_interval": 5, "warmup_steps": 2})

    repo = make_dvc_project(tmp_path / "project", {"a.txt": TINY_TEXT}, tiny, commit=True)
    dvc(repo, "repro", "train")  # from scratch: init_from is empty, base/ holds only its README
    shutil.copy(repo / "checkpoints" / "best.pt", repo / "base" / "shakespeare.pt")
    shutil.copy(repo / "checkpoints" / "last.pt", repo / "base" / "other.pt")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["init_from"] = "base/shakespeare.pt"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "corpus" / "a.txt").write_text(LETTER_TEXT)
    out = dvc(repo, "repro", "train")
    assert "Running stage 'train'" in out
    assert load_checkpoint(repo / "checkpoints" / "best.pt")["origin"]["init_from"] == "base/shakespeare.pt"
    assert "Running stage" not in dvc(repo, "repro", "train")
    shutil.copy(repo / "base" / "other.pt", repo / "base" / "shakespeare.pt")  # another base, same name
    status = dvc(repo, "status", "train")
    assert "train:" in status and "modified:" in status and "base" in status

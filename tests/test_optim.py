"""Optimizers: which parameters Muon and AdamW take, the schedule's rate on every group,
state round trips, the weight average."""

from __future__ import annotations

import pytest
import torch
from conftest import project_params, tiny_config

from pipeline.model import GPT
from pipeline.params import TrainParams
from pipeline.training.optim import lr_factor, make_optimizer
from pipeline.training.train import load_ema, update_ema

CPU = torch.device("cpu")


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(11, block_size=8, n_embd=16, bigram=True, trigram_buckets=13))


def train_params(**kw: object) -> TrainParams:
    return TrainParams(**{**project_params()["train"], **kw})


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = tiny()
    opt = make_optimizer(model, train_params(optimizer="muon", lr=1e-3), CPU)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert ids(p for g in muon.param_groups for p in g["params"]) == ids(hidden)
    # Every parameter is optimised exactly once (the tied head is the embedding).
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len(ids(everything)) and ids(everything) == ids(model.parameters())
    tables = next(g for g in adamw.param_groups if id(model.ngram.bigram.weight) in ids(g["params"]))
    assert tables["lr"] == pytest.approx(1e-3) and tables["weight_decay"] == 0.0


def test_adamw_decays_matrices_only() -> None:
    model = tiny()
    opt = make_optimizer(model, train_params(optimizer="adamw", weight_decay=0.1), CPU)
    (adamw,) = opt.optimizers
    for g in adamw.param_groups:
        if g["weight_decay"] > 0:
            assert all(p.dim() == 2 for p in g["params"])
            assert id(model.ngram.bigram.weight) not in ids(g["params"])


def test_the_schedule_scales_every_group_and_state_round_trips() -> None:
    model = tiny()
    t = train_params(optimizer="muon", lr=1e-3, min_lr=1e-4, muon_lr=0.02)
    opt = make_optimizer(model, t, CPU)
    opt.set_lr_factor(0.5)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([5e-4] * (len(lrs) - 1) + [1e-2])
    model(torch.randint(0, 11, (2, 8)))[0].sum().backward()
    opt.step()
    again = make_optimizer(model, t, CPU)
    again.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    assert len(again.optimizers[1].state) == len(opt.optimizers[1].state) > 0  # Muon's momentum


def test_lr_schedules() -> None:
    cos = train_params(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="cosine")
    assert lr_factor(0, cos) == pytest.approx(0.1)
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(55, cos) == pytest.approx(0.55)  # half way down the cosine
    assert lr_factor(100, cos) == pytest.approx(0.1)
    wsd = train_params(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", decay_frac=0.2)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.55)
    assert lr_factor(100, wsd) == pytest.approx(0.1)


def test_ema_starts_at_the_weights_then_averages() -> None:
    model = tiny()
    ema = update_ema(None, model, beta=0.9)
    first = [e.clone() for e in ema]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema = update_ema(ema, model, beta=0.9)
    for e, f in zip(ema, first, strict=True):
        torch.testing.assert_close(e, f + 0.1)
    load_ema(model, ema)
    for p, e in zip(model.parameters(), ema, strict=True):
        assert torch.equal(p, e)

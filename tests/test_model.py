"""The GPT model: the KV cache reproduces the full forward, attention is causal, rope is shift-invariant."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pipeline.model import GPT

VARIANTS = [
    {"pos_encoding": "rope", "mlp": "gelu"},
    {"pos_encoding": "learned", "mlp": "gelu"},
    {"pos_encoding": "rope", "mlp": "swiglu", "qk_norm": True},
    {"pos_encoding": "rope", "mlp": "relu2", "bias": True, "tie_weights": False},
]


def tiny(**kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = tiny_config(13, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cached_forward_matches_full_forward(kw: dict) -> None:
    model = tiny(**kw)
    idx = torch.randint(0, 13, (3, 12))  # (B, T)
    with torch.no_grad():
        full, present = model(idx)  # (B, T, V)
        head, past = model(idx[:, :7])
        tail = [model(idx[:, 7:9], past)[0]]  # two tokens at once with a past
        _, past = model(idx[:, :9])
        for t in range(9, 12):  # then one at a time
            logits, past = model(idx[:, t : t + 1], past)
            tail.append(logits)
    torch.testing.assert_close(torch.cat([head, *tail], dim=1), full, rtol=1e-4, atol=1e-5)
    assert len(present) == 2 and present[0][0].shape == (3, 2, 12, 8)  # (B, H, S, D)


def test_attention_is_causal() -> None:
    model = tiny()
    idx = torch.randint(0, 13, (1, 10))
    changed = idx.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 13
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_rotary_positions_only_matter_relatively() -> None:
    # This is what lets the sampler slide its cache past block_size.
    model = tiny()
    idx = torch.randint(0, 13, (2, 10))
    shifted = torch.arange(100, 110).expand(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model(idx, positions=shifted)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_generate_runs_past_the_context_length(pos: str) -> None:
    model = tiny(pos_encoding=pos)
    gen = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 40, temperature=0.8, top_k=5, generator=gen)
    assert out.shape == (2, 40) and int(out.max()) < 13
    again = model.generate(torch.zeros(2, 3, dtype=torch.long), 40, temperature=0.8, top_k=5,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a seed fixes the sample


def test_weight_tying_and_scaled_residual_init() -> None:
    tied, untied = tiny(), tiny(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 13 * 16
    proj_std = torch.cat([b.attn.proj.weight.flatten() for b in tied.blocks]).std().item()
    qkv_std = torch.cat([b.attn.qkv.weight.flatten() for b in tied.blocks]).std().item()
    assert proj_std < qkv_std  # residual projections start smaller (GPT-2 init)


def test_loss_is_mean_cross_entropy() -> None:
    model = tiny()
    x, y = torch.randint(0, 13, (2, 8)), torch.randint(0, 13, (2, 8))
    with torch.no_grad():
        logits, _ = model(x)
        expect = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), y.reshape(-1))
        assert model.loss(x, y).item() == pytest.approx(expect.item(), rel=1e-6)

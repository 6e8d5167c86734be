"""A decoder-only transformer (GPT) over a small vocabulary, with an optional key/value cache.

One module serves training (whole windows, causal attention), incremental
sampling (new tokens attend to cached keys/values) and ONNX export (the same
forward, traced with the cache). Shapes are written next to the tensor ops:
B batch, T new tokens, P past tokens, S = P + T, C width, H heads, D head size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from pipeline.params import ModelParams

# One (key, value) pair per layer, each (B, H, S, D).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]
# Rotary angles of the new tokens: (cos, sin), each (B, T, D/2).
Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GPTConfig(ModelParams):
    """The ``model`` params plus the vocabulary size: no defaults, so params.yaml decides."""

    vocab_size: int

    @classmethod
    def from_params(cls, m: ModelParams, vocab_size: int) -> GPTConfig:
        return cls(**asdict(m), vocab_size=vocab_size)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ngram(self) -> bool:
        return self.bigram or self.trigram_buckets > 0

    def to_dict(self) -> dict:
        return asdict(self)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Nats per token of ``targets`` (B, T) under ``logits`` (B, T, V), in float32.

    The one loss of the project: training, validation and evaluation all call it.
    """
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
    return nll if reduction == "mean" else nll.view(targets.shape)  # () or (B, T)


def causal_mask(T: int, P: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where new query i (cache index P + i) may see key j: j <= P + i.

    This is the lower-right aligned mask; ``is_causal=True`` would align it upper-left,
    which is only right without a past.
    """
    q_idx = torch.arange(T, device=device).unsqueeze(1) + P  # (T, 1)
    k_idx = torch.arange(P + T, device=device).unsqueeze(0)  # (1, S)
    return k_idx <= q_idx


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


# How many token ids before the new ones the n-gram tables read.
NGRAM_CONTEXT = 2


class NgramEmbedding(nn.Module):
    """Embeddings of the last two and three tokens as a whole, added to the token embedding.

    The bigram table is exact: one row per (previous, current) pair. The trigram table
    has one row per bucket of (two before, previous, current): the exact trigram id
    modulo the number of buckets. Each costs a lookup, not a matmul, and both start at
    zero so training begins from the plain model. The id ``vocab_size`` stands for "no
    token": before the start of the known text.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        V = cfg.vocab_size
        self.vocab_size = V
        self.bigram = nn.Embedding((V + 1) * V, cfg.n_embd) if cfg.bigram else None
        self.trigram = nn.Embedding(cfg.trigram_buckets, cfg.n_embd) if cfg.trigram_buckets else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.bigram, self.trigram):
            if table is not None:
                nn.init.zeros_(table.weight)

    def forward(self, idx: torch.Tensor, prev_ids: torch.Tensor | None) -> torch.Tensor:
        """idx (B, T) new ids; prev_ids (B, 2) the two ids before them (None: no text before)."""
        B, T = idx.shape
        V = self.vocab_size
        if prev_ids is None:
            prev_ids = idx.new_full((B, NGRAM_CONTEXT), V)
        ids = torch.cat((prev_ids, idx), dim=1)  # (B, 2 + T)
        bigram = ids[:, 1:-1] * V + idx  # (B, T) in [0, (V + 1) * V)
        out = 0.0
        if self.bigram is not None:
            out = self.bigram(bigram)  # (B, T, C)
        if self.trigram is not None:
            trigram = (ids[:, :-2] * ((V + 1) * V) + bigram) % self.trigram.num_embeddings  # (B, T)
            out = out + self.trigram(trigram)  # (B, T, C)
        return out


def previous_ids(history: torch.Tensor, n_new: int, none_id: int) -> torch.Tensor:
    """The NGRAM_CONTEXT ids before the last ``n_new`` of history (B, S), padded with ``none_id``."""
    before = history[:, : history.shape[1] - n_new][:, -NGRAM_CONTEXT:]  # (B, <= 2)
    pad = before.new_full((history.shape[0], NGRAM_CONTEXT - before.shape[1]), none_id)
    return torch.cat((pad, before), dim=1)  # (B, 2)


def rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by the angles of ``rope``."""
    # In the activations' dtype: a float32 cos/sin would upcast bfloat16 q and k.
    cos, sin = rope[0].unsqueeze(1).to(x.dtype), rope[1].unsqueeze(1).to(x.dtype)  # (B, 1, T, D/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:
            # Normalising q and k keeps attention logits bounded, which tolerates higher LRs.
            self.q_norm = LayerNorm(cfg.head_size, bias=False)
            self.k_norm = LayerNorm(cfg.head_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, C) -> (B, T, C) and the present (key, value); ``mask`` (T, S) goes with a past."""
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_size
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotary(q, rope), rotary(k, rope)
        if past is None and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # On CPU in bfloat16 the fused kernel is 2-3x slower than these three ops for
            # short windows (forward + backward at T = 128, D = 32).
            att = (q @ k.transpose(-2, -1)) * D**-0.5  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # float32 under autocast
            y = F.dropout(att, self.cfg.dropout, self.training) @ v  # (B, H, T, D)
        elif past is None:
            # Whole window: the fused kernel's causal mask is exactly right.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True,
                dropout_p=self.cfg.dropout if self.training else 0.0,
            )  # (B, H, T, D)
        else:
            k = torch.cat((past[0], k), dim=2)  # (B, H, S, D)
            v = torch.cat((past[1], v), dim=2)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            # 8/3 x width keeps the parameter count equal to a 4x GELU MLP.
            hidden = int(8 * cfg.n_embd / 3 + 31) // 32 * 32
            self.fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
        else:
            hidden = 4 * cfg.n_embd
            self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h)
            h = h * h  # a Mul in the exported graph, cheaper there than a Pow
        else:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, past, mask):
        a, present = self.attn(self.ln_1(x), rope, past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.ngram = NgramEmbedding(cfg) if cfg.ngram else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # Input and output embeddings share one matrix: fewer parameters, and on a
            # small vocabulary it trains as well or better.
            self.lm_head.weight = self.wte.weight
        if cfg.pos_encoding == "rope":
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size))
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)
        self.apply(self._init_weights)
        if self.ngram is not None:
            self.ngram.reset_parameters()  # apply() above drew its tables like wte

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            std = 0.02
            if getattr(m, "residual", False):
                # GPT-2: residual projections scaled so the residual stream's variance
                # does not grow with depth.
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        past: KVCache | None = None,
        positions: torch.Tensor | None = None,
        prev_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits for every new token, and the updated cache.

        idx: (B, T) token ids.  past: per-layer (key, value), each (B, H, P, D), or None
        for a fresh window.  positions: (B, T) absolute positions of the new tokens;
        defaults to P..P+T-1 (as (1, T), broadcast over the batch).  prev_ids: (B, 2) the
        ids just before idx, read by the n-gram tables; None: no text before idx.
        mask: (T, S) bool, which cache entries each new token sees, with a past; defaults
        to the causal mask of a chronological cache (``causal_mask``).
        Returns logits (B, T, V) and the present cache (B, H, S, D).
        """
        B, T = idx.shape
        P = 0 if past is None else past[0][0].shape[2]
        if positions is None:
            positions = torch.arange(P, P + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.wte(idx)  # (B, T, C)
        if self.ngram is not None:
            x = x + self.ngram(idx, prev_ids)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)  # (B, T, C)
        else:
            angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, D/2)
            rope = (angles.cos(), angles.sin())  # computed once for every layer
        if past is not None and mask is None:
            mask = causal_mask(T, P, idx.device)  # (T, S)
        x = self.drop(x)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rope, None if past is None else past[i], mask)
            present.append(kv)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.cfg.logit_cap > 0:
            # Soft cap: logits stay within +-cap, which keeps early training from overconfidence.
            logits = self.cfg.logit_cap * torch.tanh(logits / self.cfg.logit_cap)
        return logits, present

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per token over (B, T) windows."""
        logits, _ = self(idx)
        return cross_entropy(logits, targets)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx (B, T) with the KV cache; returns (B, max_new_tokens).

        With rotary positions the cache slides past block_size (only relative positions
        matter); with learned positions the window is re-encoded once it is full.
        """
        window, V = self.cfg.block_size, self.cfg.vocab_size
        history = idx[:, -(window + NGRAM_CONTEXT):]  # what the next steps may read, (B, <= W + 2)
        logits, past = self(idx[:, -window:], prev_ids=previous_ids(history, min(idx.shape[1], window), V))
        pos = min(idx.shape[1], window)
        out = []
        for _ in range(max_new_tokens):
            last = logits[:, -1, :].float() / temperature  # (B, V)
            if top_k:
                kth = torch.topk(last, min(top_k, last.size(-1))).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(last, dim=-1), 1, generator=generator)  # (B, 1)
            out.append(nxt)
            history = torch.cat((history, nxt), dim=1)[:, -(window + NGRAM_CONTEXT):]
            if self.wpe is None:
                past = [(k[:, :, -(window - 1):], v[:, :, -(window - 1):]) for k, v in past]
                positions = torch.full_like(nxt, pos)
                logits, past = self(nxt, past, positions, previous_ids(history, 1, V))
                pos += 1
            elif pos < window:
                logits, past = self(nxt, past, prev_ids=previous_ids(history, 1, V))
                pos += 1
            else:
                logits, past = self(history[:, -window:], prev_ids=previous_ids(history, window, V))
        return torch.cat(out, dim=1)

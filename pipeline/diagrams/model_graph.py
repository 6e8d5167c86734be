"""The model as a Mermaid flowchart, with the sizes and tensor shapes of a config.

The sizes are read off a real ``GPT`` built on PyTorch's meta device (no memory, no
weights), so the picture follows pipeline/model.py: a renamed layer fails here, loudly.
B is the batch, T the new tokens, P the tokens already in the key/value cache.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.diagrams.markdown import Diagram
from pipeline.model import GPT, GPTConfig

ACTIVATIONS = {"gelu": "GELU", "relu2": "ReLU²", "swiglu": "SiLU(a) · b"}
STYLES = (
    "classDef io fill:#f8fafc,stroke:#64748b,color:#0f172a",
    "classDef layer fill:#dbeafe,stroke:#1d4ed8,color:#0f172a",
    "classDef cache fill:#fef9c3,stroke:#a16207,color:#0f172a",
)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear(name: str, layer: nn.Linear) -> str:
    bias = ", bias" if layer.bias is not None else ""
    return f"{name}: Linear {layer.in_features} → {layer.out_features}{bias}"


def model_diagram(cfg: GPTConfig) -> Diagram:
    """The model ``cfg`` describes."""
    with torch.device("meta"):
        model = GPT(cfg)
    block = model.blocks[0]
    V, C, H, D = cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.head_size
    tied = "<br/>tied: the same matrix as wte" if cfg.tie_weights else ""
    cap = f"<br/>then {cfg.logit_cap:g} · tanh(logits / {cfg.logit_cap:g})" if cfg.logit_cap > 0 else ""
    lines = [
        "flowchart TD",
        '    ids[/"input_ids (B, T) int64"/]:::io',
        '    pos[/"position_ids (B, T) int64"/]:::io',
        '    mask[/"attn_mask (T, S) bool<br/>which slots each new token sees"/]:::io',
        '    cidx[/"cache_index (B,) int64<br/>the first new token\'s slot"/]:::io',
        f'    wte["token embedding wte<br/>{V} × {C}"]:::layer',
        "    ids --> wte",
    ]
    x_in = "wte"
    if model.ngram is not None:
        tables = []
        if model.ngram.bigram is not None:
            tables.append(f"bigram (previous, current): {model.ngram.bigram.num_embeddings:,} × {C}")
        if model.ngram.trigram is not None:
            tables.append(f"hashed trigram: {model.ngram.trigram.num_embeddings:,} buckets × {C}")
        lines += [
            '    prev[/"prev_ids (B, 2) int64<br/>the two ids before input_ids"/]:::io',
            f'    ngram["n-gram tables<br/>{"<br/>".join(tables)}"]:::layer',
            '    addn(("+"))', "    ids --> ngram", "    prev --> ngram", "    wte --> addn", "    ngram --> addn",
        ]
        x_in = "addn"
    if cfg.pos_encoding == "rope":
        half = model.inv_freq.shape[0]
        lines += [f'    rope["rotary angles cos, sin<br/>(B, T, {half}) each"]:::layer', "    pos --> rope"]
    else:
        lines += [
            f'    wpe["position embedding wpe<br/>{cfg.block_size} × {C}"]:::layer',
            '    addp(("+"))', "    pos --> wpe", f"    {x_in} --> addp", "    wpe --> addp",
        ]
        x_in = "addp"
    lines += [
        f'    subgraph blocks["{cfg.n_layer} × Block, {_params(block):,} parameters each"]',
        f'        ln1["LayerNorm {C}"]:::layer',
        f'        qkv["{_linear("qkv", block.attn.qkv)}<br/>q, k, v (B, {H}, T, {D}) each"]:::layer',
    ]
    qk = "qkv"
    if cfg.qk_norm:
        lines += [f'        qkn["LayerNorm {D} on q and k"]:::layer', "        qkv --> qkn"]
        qk = "qkn"
    if cfg.pos_encoding == "rope":
        lines += ['        rot["rotate q and k"]:::layer', f"        {qk} --> rot"]
        qk = "rot"
    hidden = block.mlp.proj.in_features
    lines += [
        f'        past[("this layer\'s cache<br/>key, value<br/>(B, {H}, S, {D}) each")]:::cache',
        '        cat["write k, v into slots<br/>cache_index + t (mod S)"]:::layer',
        f'        present[("present key, value<br/>(B, {H}, S, {D}) each,<br/>the same buffers")]:::cache',
        f'        att["masked attention<br/>{H} heads of {D}<br/>softmax(q kᵀ / √{D}) v<br/>→ (B, T, {C})"]:::layer',
        f'        proj["{_linear("proj", block.attn.proj)}"]:::layer',
        '        add1(("+"))',
        f'        ln2["LayerNorm {C}"]:::layer',
        f'        fc["{_linear("fc", block.mlp.fc)}"]:::layer',
        f'        act["{ACTIVATIONS[cfg.mlp]} (B, T, {hidden})"]:::layer',
        f'        down["{_linear("proj", block.mlp.proj)}"]:::layer',
        '        add2(("+"))',
        "    end",
        f'    lnf["LayerNorm {C}"]:::layer',
        f'    head["{_linear("lm_head", model.lm_head)}{tied}{cap}"]:::layer',
        f'    logits[/"logits (B, T, {V})"/]:::io',
        f'    {x_in} -- "x (B, T, {C})" --> ln1',
        f"    {x_in} -- residual --> add1",
        "    ln1 --> qkv",
        f"    {qk} -- q --> att",
        f"    {qk} -- k, v --> cat",
        "    past --> cat",
        "    cidx --> cat",
        "    cat --> att",
        "    mask --> att",
        "    cat --> present",
        "    att --> proj --> add1",
        "    add1 --> ln2 --> fc --> act --> down --> add2",
        "    add1 -- residual --> add2",
        f'    add2 -- "× {cfg.n_layer} layers" --> lnf',
        "    lnf --> head --> logits",
    ]
    if cfg.pos_encoding == "rope":
        lines.append("    rope --> rot")
    lines += [f"    {s}" for s in STYLES]
    caption = (
        f"{model.num_params():,} parameters; B batch, T new tokens, S cache slots (at least T; "
        f"a ring once the context is full), vocabulary of {V} tokens, context of {cfg.block_size}."
    )
    return Diagram("model", "\n".join(lines) + "\n", caption)

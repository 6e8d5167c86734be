"""DVC stage `encode`: data/raw -> data/encoded (vocab.json, meta.json, {train,val,test}.bin)."""

from __future__ import annotations

from pipeline.encode import encode_corpus
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    params = load_params()
    meta = encode_corpus(params.download.out_dir, params.encode)
    splits = ", ".join(f"{name} {n:,}" for name, n in meta["splits"].items())
    print(
        f"encoded {meta['documents']} documents into {params.encode.out_dir}: "
        f"vocab {meta['vocab_size']} ({meta['dtype']}), tokens {splits}"
    )


if __name__ == "__main__":
    run_stage(main)

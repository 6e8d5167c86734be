"""DVC stage `encode`: data/raw -> data/encoded (tokenizer.json, meta.json, {train,val,test}.bin);
when fine-tuning, with the base checkpoint's tokenizer."""

from __future__ import annotations

import argparse
from functools import partial

from pipeline.params import load_params
from pipeline.stage import run_stage
from pipeline.tokens.encode import encode_corpus
from pipeline.training.finetune import finetune_tokenizer, load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    vocabulary = None
    if params.finetune.init_from:  # fine-tuning: the base model's tokenizer
        base = load_base(params.finetune.init_from)
        vocabulary = partial(finetune_tokenizer, base, new_chars=params.finetune.new_chars,
                             normalize_nfc=params.encode.normalize_nfc)
    meta = encode_corpus(params.download.out_dir, params.encode, vocabulary)
    splits = ", ".join(f"{name} {n:,}" for name, n in meta["splits"].items())
    print(
        f"encoded {meta['documents']} documents into {params.encode.out_dir}: "
        f"vocab {meta['vocab_size']} ({meta['dtype']}), tokens {splits}"
    )


if __name__ == "__main__":
    run_stage(main)

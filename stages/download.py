"""DVC stage `download`: fetch the corpus sources into data/raw (see pipeline/corpus/download.py)."""

from __future__ import annotations

import argparse
import sys

from pipeline.corpus.download import run_download
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    params = load_params(parser.parse_args().params)
    s = run_download(params.download)
    print(f"download: {s.documents} documents, {s.chars:,} characters in {s.out_dir} "
          f"({s.downloaded} downloaded, {s.cached} from cache)", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)

"""DVC stage: fetch the corpus sources into data/raw (see pipeline/download.py)."""

from __future__ import annotations

import argparse
import sys

from pipeline.download import run_download
from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    s = run_download(load_params(args.params).download)
    print(f"download: {s.documents} documents, {s.chars:,} characters in {s.out_dir} "
          f"({s.downloaded} downloaded, {s.cached} from cache)", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)

"""``python -m pipeline.tuning``: search the hyperparameters named in tune.yaml.

Every trial is a DVC experiment (``dvc exp show`` lists them); the study lives in the
storage tune.yaml names, so the same command continues an interrupted search and
several machines can share one study. Run it from the project root.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings

from pipeline.stage import run_stage
from pipeline.tuning.config import DEFAULT_CONFIG_PATH, TuneError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tuning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, help="search trials the study should hold, pruned ones "
                        "included (default: tune.yaml's trials); a resumed search runs only the rest")
    parser.add_argument("--confirm", type=int, help="re-run the best N at params.yaml's full budget "
                        "(default: tune.yaml's confirm; 0: none)")
    parser.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="search settings (default: tune.yaml)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    for name in ("trials", "confirm", "timeout"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name == "trials" and value == 0)):
            raise TuneError(f"--{name}: must be {'positive' if name == 'trials' else 'at least 0'}, got {value:g}")
    cfg = load_config(args.config, args.params)

    import optuna

    from pipeline.tuning.experiment import check_project
    from pipeline.tuning.search import (
        finished,
        full_study,
        open_storage,
        run_confirmation,
        run_search,
        search_study,
        study_names,
    )
    from pipeline.tuning.summary import print_summary, summarize, write_summary

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own progress
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = cfg.settings
    check_project(s.stage, cfg.metric_file, cfg.metric_key)
    storage = open_storage(s.storage)
    trials = args.trials or s.trials
    confirm = s.confirm if args.confirm is None else args.confirm
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends the search as Ctrl-C does
    search = search_study(storage, cfg)
    full = full_study(storage, cfg) if f"{s.study}-full" in study_names(storage) else None
    try:
        run_search(cfg, search, trials, deadline)
        if confirm and finished(search) >= trials:
            full = full or full_study(storage, cfg)
            run_confirmation(cfg, full, search, confirm, deadline)
    except KeyboardInterrupt:
        write_summary(cfg, summarize(cfg, search, full), search)
        print("interrupted: run the same command to continue the search", file=sys.stderr)
        raise SystemExit(130) from None
    summary = summarize(cfg, search, full)
    path = write_summary(cfg, summary, search)
    print_summary(cfg, summary)
    print(f"summary: {path} (dvc metrics show, dvc plots show); trials: dvc exp show")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    run_stage(main)

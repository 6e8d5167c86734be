"""The ``chargen`` command line: generate, bench, eval and info on exported ONNX models.

Start-up time is part of the product (first character in well under half a second),
so this module imports only typer at load time; numpy, onnxruntime and the runtime
are imported inside the commands that need them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn

import typer

from chargen import contract
from chargen.entry import EXIT_INTERRUPTED
from chargen.errors import ChargenError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from chargen.model import ChargenModel
    from chargen.textfile import TextSource

MODEL_ENV = "CHARGEN_MODEL"
EXIT_ERROR = 1
EXIT_NO_MODEL = 2  # same code as a usage error: the command line lacked something it needs
MAX_THREADS = os.cpu_count() or 1  # more intra-op threads than cores only contend

app = typer.Typer(
    name="chargen",
    help="Generate and measure text with a character-level GPT exported to ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# The precisions of the contract as a CLI choice.
Precision = Enum("Precision", [(p, p) for p in contract.PRECISIONS], type=str)


class ModelNotFound(ChargenError):
    """No model file where the user pointed, nor in the default places."""


# -------------------------------------------------------------------------- helpers


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def resolve_model(model: Path | None, precision: Precision) -> Path:
    """--model, else $CHARGEN_MODEL, else models/model.<precision>.onnx under the cwd."""
    if model is not None:
        if not model.exists():
            raise ModelNotFound(f"model file {model} (from --model) does not exist")
        return model
    env = os.environ.get(MODEL_ENV)
    if env:
        if not Path(env).exists():
            raise ModelNotFound(f"model file {env} (from ${MODEL_ENV}) does not exist")
        return Path(env)
    default = contract.model_path(precision.value)
    if default.exists():
        return default
    raise ModelNotFound(
        f"no model found (looked at --model: not given, ${MODEL_ENV}: not set, {default}: "
        "missing); run `dvc repro` in the project to build one, or pass --model PATH"
    )


def load_model(path: Path, threads: int) -> ChargenModel:
    from chargen.model import ChargenModel

    return ChargenModel.load(path, threads=threads)


def run_command(body: Callable[..., None], *args: object) -> None:
    """Run a command body: user errors become one line and an exit code, never a traceback."""
    try:
        body(*args)
    except ModelNotFound as e:
        fail(str(e), EXIT_NO_MODEL)
    except ChargenError as e:
        fail(str(e))
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly.
        _silence_stdout()
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except MemoryError as e:  # numpy names the allocation: "Unable to allocate 1.4 GiB for an array ..."
        fail(f"not enough memory ({' '.join(str(e).split()) or 'an allocation failed'}); "
             "ask for less: a smaller --batch-size or --num-samples")


def read_text_arg(value: str, what: str) -> str:
    """A literal string, or the contents of stdin when it is '-'.

    stdin is decoded as UTF-8 whatever the locale says (a C locale would otherwise
    let invalid bytes through as surrogate escapes); line ends are the tokenizer's
    business, as for a file."""
    if value != "-":
        return value
    try:
        return stdin().read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChargenError(
            f"{what} from stdin is not UTF-8 text (byte {e.start}); convert it first (e.g. iconv -t utf-8)"
        ) from None
    except OSError as e:
        raise ChargenError(f"cannot read {what} from stdin ({e.strerror})") from None


def stdin() -> BinaryIO:
    """Standard input's bytes; a user error when the shell closed it (<&-)."""
    if sys.stdin is None:
        raise ChargenError("standard input is closed; pipe the text in (e.g. cat FILE | chargen ...)")
    return sys.stdin.buffer


def quoted_chars(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


# -------------------------------------------------------------------------- option checks


def _positive_temperature(value: float) -> float:
    if not (value >= contract.MIN_TEMPERATURE and math.isfinite(value)):
        raise typer.BadParameter(f"must be a finite number >= {contract.MIN_TEMPERATURE:g} (got {value}); "
                                 "lower is more conservative, e.g. 0.8")
    return value


def _top_p_range(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1] (got {value}); 1 turns nucleus sampling off")
    return value


ModelOpt = typer.Option(
    None, "--model", "-m", dir_okay=False,
    help=f"ONNX model file. Default: ${MODEL_ENV}, else models/model.<precision>.onnx.",
)
PrecisionOpt = typer.Option(
    Precision(contract.DEFAULT_PRECISION), "--precision", "-p",
    help="Which exported model to use when --model is not given.",
)
ThreadsOpt = typer.Option(
    1, "--threads", min=0, max=MAX_THREADS,
    help=f"ONNX Runtime intra-op threads, up to the {MAX_THREADS} cores (0: one per core).",
)
# Scoring has plenty of independent work: one batch per core at once, each call on one
# thread, keeps the cores busier than splitting each call across them.
EvalThreadsOpt = typer.Option(
    0, "--threads", min=0, max=MAX_THREADS,
    help=f"Batches scored at once, one ONNX Runtime thread each, up to the {MAX_THREADS} cores "
    "(0, the default: one per core).",
)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of text.")


# -------------------------------------------------------------------------- generate


@app.command()
def generate(
    prompt: str = typer.Argument("", help="Text to continue ('-' reads stdin). Empty: start a new document."),
    max_new_chars: int = typer.Option(500, "--max-new-chars", "-n", min=0, help="Most characters to generate per sample."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", callback=_positive_temperature, help="Softmax temperature (> 0; near 0 it always picks the most likely character)."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample only from the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", callback=_top_p_range, help="Sample from the smallest set with this much probability, in (0, 1]."),
    seed: int | None = typer.Option(None, "--seed", "-s", min=0, help="Random seed (>= 0): same model, prompt and seed give the same text."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, max=256, help="Independent samples, generated together in one batch."),
    stop_at_eot: bool = typer.Option(True, "--stop-at-eot/--no-stop-at-eot", help="End a sample when the model emits end-of-text."),
    new_document: bool = typer.Option(False, "--new-document", help="The prompt starts a new document (a new record: one equation of an arithmetic model)."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before its continuation."),
    strict: bool = typer.Option(False, "--strict", help="Refuse prompt characters outside the vocabulary instead of warning."),
    draft: bool = typer.Option(True, "--draft/--no-draft", help="Check the model file's guesses of the next characters in the same call (one sample; faster). --no-draft: one character per call."),
    precision: Precision = PrecisionOpt,
    model: Path | None = ModelOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Continue PROMPT, streaming characters as they are produced.

    With --num-samples above 1 each sample starts with a line "=== sample I/N ===": the first streams live, the others follow when generation ends.

    \b
    Examples:
      chargen generate "ROMEO:" -n 300
      chargen generate "To be" --seed 7 --temperature 0.6 --top-p 0.9
      chargen generate --num-samples 4 -n 200 --precision fp32
      echo "Once upon a time" | chargen generate - --model path/to/model.onnx
      chargen generate "123+456=" --top-k 1 --new-document -m recipes/arithmetic/models/model.int8.onnx
    """
    run_command(
        _generate, prompt, max_new_chars, temperature, top_k, top_p, seed, num_samples,
        stop_at_eot, new_document, echo, strict, draft, precision, model, threads,
    )


def _generate(
    prompt: str, max_new_chars: int, temperature: float, top_k: int, top_p: float,
    seed: int | None, num_samples: int, stop_at_eot: bool, new_document: bool, echo: bool, strict: bool,
    draft: bool, precision: Precision, model: Path | None, threads: int,
) -> None:
    from chargen.generate import generate

    prompt = read_text_arg(prompt, "the prompt")
    m = load_model(resolve_model(model, precision), threads)
    unknown = m.tokenizer.unknown_chars(prompt)
    if unknown and strict:
        raise ChargenError(
            f"prompt has characters not in the model's vocabulary: {quoted_chars(unknown)} "
            "(remove them, or drop --strict to read them as the unknown token)"
        )
    if unknown:
        warn(
            f"prompt has characters not in the model's vocabulary: {quoted_chars(unknown)}; "
            "they are read as the unknown token"
        )
    out = sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a non-UTF-8 terminal shows '?' rather than crashing
    header = (lambda i: f"=== sample {i + 1}/{num_samples} ===\n") if num_samples > 1 else (lambda i: "")
    head = prompt if echo else ""
    rest: list[list[str]] = [[header(i), head] for i in range(1, num_samples)]
    out.write(header(0) + head)
    out.flush()
    # Last character written per sample: each sample ends with a newline when samples
    # are separated (an empty sample shows as an empty line), a lone one only on a
    # terminal (a pipe gets exactly the generated text).
    tails = [head[-1:]] * num_samples
    steps = generate(m, prompt, max_new_chars, temperature, top_k, top_p, seed, num_samples, stop_at_eot,
                     new_document, draft)
    for chars in steps:
        if chars[0]:
            out.write(chars[0])
            out.flush()
        for i, ch in enumerate(chars):
            if ch:
                tails[i] = ch[-1]
                if i:
                    rest[i - 1].append(ch)
    if (num_samples > 1 or out.isatty()) and tails[0] != "\n":
        out.write("\n")
    for i, parts in enumerate(rest, start=1):
        out.write("".join(parts) + ("" if tails[i] == "\n" else "\n"))
    out.flush()


# -------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(
    file: str = typer.Argument(..., help="UTF-8 text file to score ('-' reads stdin)."),
    both: bool = typer.Option(False, "--both", help="Score with the fp32 and the int8 model and show the difference."),
    precision: Precision = PrecisionOpt,
    model: Path | None = ModelOpt,
    threads: int = EvalThreadsOpt,
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Windows per session call (default: the fastest measured).",
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress",
        help="Progress bar on stderr (default: on a terminal, for files that take over half a second).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Loss per character (nats and bits) of a text under a model (--json adds the loss per token).

    Windows follow the pipeline's scoring rule, so the numbers are comparable with the metrics of the evaluate and compare stages; per-character figures compare models whatever their tokenizer. The text is read in pieces: memory stays flat however long it is, and a progress bar shows on long files.

    \b
    Examples:
      chargen eval my_text.txt
      chargen eval my_text.txt --both
      cat notes.txt | chargen eval - --json
    """
    run_command(_eval, file, both, precision, model, threads, batch_size, progress, as_json)


def _eval(
    file: str, both: bool, precision: Precision, model: Path | None, threads: int,
    batch_size: int | None, progress: bool | None, as_json: bool,
) -> None:
    if both and model is not None:
        raise typer.BadParameter("--both scores models/model.{fp32,int8}.onnx; drop --model", param_hint="--both")
    source = _open_text(file)
    if both:
        paths = [_default_model(p) for p in (Precision.fp32, Precision.int8)]
    else:
        paths = [resolve_model(model, precision)]
    from chargen.progress import Progress
    from chargen.scoring import BATCH_SIZE, score_stream, scored_chars, summarize

    models = [load_model(path, 1) for path in paths]  # one thread per call; calls run side by side
    tokenizer = models[0].tokenizer
    if any(m.tokenizer != tokenizer for m in models):
        raise ChargenError("the fp32 and int8 models have different tokenizers; re-run `dvc repro`")
    # Asked for: drawn from the start; on a terminal: only once the job proves long.
    show = sys.stderr.isatty() if progress is None else progress
    bar = Progress(source.size, "B", delay=0.0 if progress else 0.5) if show else None
    unknown: dict[str, None] = {}
    per_token = tokenizer.chars_per_token()
    chars = 0  # characters the scored tokens stand for: every token but the first
    seen = 0  # tokens so far

    def token_pieces() -> Iterator[np.ndarray]:
        nonlocal chars, seen
        for piece in source.pieces():
            unknown.update(dict.fromkeys(tokenizer.unknown_chars(piece)))
            ids = tokenizer.encode(piece)
            yield ids
            chars += scored_chars(ids, per_token) if seen == 0 else int(per_token[ids].sum())
            seen += ids.size
            if bar:
                bar.update(source.bytes_read, chars)

    try:
        # The first char is not scored.
        scored = score_stream(models, token_pieces(), batch_size or BATCH_SIZE, threads or MAX_THREADS)
    finally:
        if bar:
            bar.close()
    results = []
    for path, m, (total, n) in zip(paths, models, scored, strict=True):
        if n == 0 or chars == 0:  # one token: e.g. two code points that NFC merges into one
            raise ChargenError(f"{source.name} is too short to score (needs at least 2 tokens); give more text")
        s = summarize(total, n, chars)
        results.append({"model": str(path), "precision": m.precision, "chars": s["chars"], "tokens": n,
                        "nats_per_char": s["nats_per_char"], "bits_per_char": s["bpc"], "loss": s["loss"]})
    if unknown:  # after the too-short error, which is then the only line
        warn(f"text has characters not in the vocabulary: {quoted_chars(list(unknown))}; "
             "they are scored as the unknown token")
    if as_json:
        obj: dict = {"file": file, "results": results}
        if both:
            obj["int8_minus_fp32_bits_per_char"] = results[1]["bits_per_char"] - results[0]["bits_per_char"]
        typer.echo(json.dumps(obj, indent=2))
        return
    typer.echo(f"{'model':<32} {'precision':<9} {'chars':>9} {'tokens':>9} {'nats/char':>9} {'bits/char':>9}")
    for r in results:
        typer.echo(f"{r['model']:<32} {r['precision']:<9} {r['chars']:>9} {r['tokens']:>9} "
                   f"{r['nats_per_char']:>9.4f} {r['bits_per_char']:>9.4f}")
    if both:
        diff = results[1]["bits_per_char"] - results[0]["bits_per_char"]
        typer.echo(f"int8 - fp32: {diff:+.4f} bits/char")


def _open_text(file: str) -> TextSource:
    """The text to score: stdin for '-', else the file (opened now, read in pieces later)."""
    from chargen.textfile import TextSource

    if file == "-":
        return TextSource(stdin(), "the text from stdin")
    if not file:
        raise ChargenError("the file name is empty; give a text file, or '-' to read stdin")
    path = Path(file)
    try:
        return TextSource(path.open("rb"), str(path))
    except FileNotFoundError:
        raise ChargenError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ChargenError(f"{path} is a directory; give a text file") from None
    except OSError as e:
        raise ChargenError(f"{path}: cannot read it ({e.strerror})") from None


def _default_model(precision: Precision) -> Path:
    path = contract.model_path(precision.value)
    if not path.exists():
        raise ModelNotFound(f"{path} does not exist; run `dvc repro` in the project to build it")
    return path


# -------------------------------------------------------------------------- bench


@app.command()
def bench(
    fp32: Path | None = typer.Option(None, "--fp32", dir_okay=False, help="fp32 model (default models/model.fp32.onnx)."),
    int8: Path | None = typer.Option(None, "--int8", dir_okay=False, help="int8 model (default models/model.int8.onnx)."),
    int4: Path | None = typer.Option(None, "--int4", dir_okay=False, help="int4 model (default models/model.int4.onnx)."),
    chars: int = typer.Option(400, "--chars", min=1, help="Characters timed per measurement."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Measurements per cell; the median is shown."),
    threads: int = ThreadsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Speed of the fp32, int8 and int4 models side by side.

    Single-stream characters per second and time to the first character, with a short context (fresh prompt) and a long one (the context window full and sliding).

    \b
    Examples:
      chargen bench
      chargen bench --threads 2 --json
    """
    run_command(_bench, {"fp32": fp32, "int8": int8, "int4": int4}, chars, repeats, threads, as_json)


def _bench(given: dict[str, Path | None], chars: int, repeats: int, threads: int, as_json: bool) -> None:
    import statistics
    import time

    from chargen.speed import measure_speed

    results: dict[str, dict] = {}
    for name, path in given.items():
        if path is not None and not path.exists():  # named by the user: a mistake, not a gap
            raise ModelNotFound(f"model file {path} (from --{name}) does not exist")
        path = path or contract.model_path(name)
        if not path.exists():
            warn(f"{path} does not exist; skipping {name} (run `dvc repro` or pass --{name})")
            continue
        t0 = time.perf_counter()
        m = load_model(path, threads)
        load_s = time.perf_counter() - t0
        W = m.block_size
        cells = {"short": (1, min(chars, max(1, W - 2))), "long": (4 * W, chars)}
        row: dict = {"model": str(path), "load_ms": 1e3 * load_s}
        measure_speed(m, 1, 5)  # warm-up: the first session runs allocate ORT's buffers
        for ctx, (context_chars, timed) in cells.items():
            runs = [measure_speed(m, context_chars, timed, seed=r) for r in range(repeats)]
            row[f"{ctx}_first_char_ms"] = 1e3 * statistics.median(r["first_char_s"] for r in runs)
            row[f"{ctx}_chars_per_s"] = statistics.median(r["chars_per_s"] for r in runs)
        results[name] = row
    if not results:
        raise ModelNotFound("no model to benchmark; run `dvc repro` in the project, or pass --fp32/--int8/--int4")
    if as_json:
        typer.echo(json.dumps({"threads": threads, "timed_chars": chars, "results": results}, indent=2))
        return
    names = list(results)
    typer.echo(f"{'':<28}" + "".join(f"{n:>12}" for n in names))
    for key, label, fmt in (
        ("load_ms", "load (ms)", "{:>12.1f}"),
        ("short_first_char_ms", "short ctx: first char (ms)", "{:>12.2f}"),
        ("short_chars_per_s", "short ctx: chars/s", "{:>12.0f}"),
        ("long_first_char_ms", "long ctx: first char (ms)", "{:>12.2f}"),
        ("long_chars_per_s", "long ctx: chars/s", "{:>12.0f}"),
    ):
        typer.echo(f"{label:<28}" + "".join(fmt.format(results[n][key]) for n in names))
    typer.echo(f"(threads={threads}; long context = window full and sliding)")


# -------------------------------------------------------------------------- info


@app.command()
def info(
    precision: Precision = PrecisionOpt,
    model: Path | None = ModelOpt,
    as_json: bool = JsonOpt,
) -> None:
    """What is in a model file: size, vocabulary, context length, precision, metrics.

    \b
    Examples:
      chargen info
      chargen info --precision fp32 --json
    """
    run_command(_info, precision, model, as_json)


def _info(precision: Precision, model: Path | None, as_json: bool) -> None:
    path = resolve_model(model, precision)
    m = load_model(path, 1)
    cfg = m.config
    tok = m.tokenizer
    summary = {
        "model": str(path),
        "precision": m.precision,
        "file_bytes": path.stat().st_size,
        "parameters": m.num_params,
        "tokenizer": f"{tok.kind}, {tok.size} tokens",
        "context_length": m.block_size,  # tokens
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "pos_encoding": cfg.pos_encoding,
        "draft_table": "none (one token per call)" if m.draft is None else
                       f"{m.draft.context}-token contexts, {m.draft.table.size:,} entries",
    }
    context_chars = m.metrics.get("context_chars")
    if isinstance(context_chars, int | float):  # measured on the test split by the evaluate stage
        summary["context_chars"] = round(context_chars)
    if as_json:
        details = {"tokenizer": tok.describe(), "config": m.config_dict, "metrics": m.metrics, "origin": m.origin}
        typer.echo(json.dumps({**summary, **details}, indent=2, ensure_ascii=False))
        return
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) and key in ("file_bytes", "parameters") else value
        if key == "context_length":
            shown = f"{value} tokens"
        typer.echo(f"{key + ':':<16}{shown}")
    for title, values in (("origin", m.origin), ("metrics", m.metrics)):
        if title == "origin" and not values:
            continue
        typer.echo(f"{title}:" + ("" if values else "       (none recorded)"))
        for key, value in _flatten(values):
            shown = f"{value:.4f}" if isinstance(value, float) else value
            typer.echo(f"  {key + ':':<28}{shown}")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows.extend(_flatten(v, f"{prefix}{k}."))
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def main() -> None:
    """The command line: every way a run can end is an exit code and at most one line
    on stderr — a usage mistake, a closed pipe or a full disk — never a traceback.
    Ctrl-C outside a command is ``chargen.entry``'s, which runs this."""
    if sys.stdout is None:  # the shell closed it (>&-): nothing could be printed
        typer.echo("error: standard output is closed; redirect it (to a file or /dev/null)", err=True)
        raise SystemExit(EXIT_ERROR)
    try:
        try:
            code = app(prog_name="chargen", standalone_mode=False) or 0  # typer.Exit's code
        except _NoArgsIsHelp:
            code = EXIT_NO_MODEL  # the help was shown; a command is still missing
        except _click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "chargen"
            typer.echo(f"error: {' '.join(e.format_message().split())} (see '{where} --help')", err=True)
            code = e.exit_code
        except SystemExit as e:
            # A closed pipe while the help is printed (`--help | head -n 1`): typer and
            # rich silence stdout and exit 1 from their handler, where `| head` is no failure.
            pipe = e.__context__
            if e.code != 1 or not (isinstance(pipe, OSError) and pipe.errno == errno.EPIPE):
                raise
            code = 0
        sys.stdout.flush()  # a full disk shows here, not at the interpreter's exit
    except BrokenPipeError:
        _silence_stdout()
        code = 0
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        _silence_stdout()
        typer.echo(f"error: cannot write the output ({e.strerror}); free some disk space or "
                   "write somewhere else", err=True)
        code = EXIT_ERROR
    raise SystemExit(code)


# typer raises click's exceptions (recent typer vendors click): the module that defines
# typer.BadParameter defines them all.
_click_errors = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())  # click >= 8.2
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT}


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()

"""Bad input gets one line naming what was wrong and an exit code, never a traceback, and
leaves nothing half-written: property tests throw random option values at the CLI, random
edits at a model file's metadata and random values at every params field; then the cases
found by hand."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import typing
from pathlib import Path

import onnx
import pytest
import yaml
from conftest import (
    TINY_TEXT,
    project_params,
    run_stage_script,
    tiny_tokenizer,
    write_corpus,
    write_encoded,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import chargen

from chargen import cli, contract, entry
from chargen.errors import ChargenError
from pipeline.params import Params, ParamsError, load_params
from pipeline.stage import run_stage
from pipeline.training.checkpoint import _clip

CLI_EXAMPLES = settings(max_examples=25, deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_clean(r: subprocess.CompletedProcess) -> None:
    """Success, or an exit code with exactly one line on stderr that starts with 'error:'."""
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        return
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2), r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# ---------------------------------------------------------------------------- CLI options

numbers = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "abc", "1e400", "-0", "0x10", " 3", "nan", "-inf"]),
)
OPTIONS = ["--temperature", "--top-k", "--top-p", "--seed", "--num-samples", "--threads"]
# A valid but huge -n would only generate for a long time: lengths stay small or invalid.
lengths = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["", "x", "2.5", "1e3", "-0", "nan"]))


@CLI_EXAMPLES
@given(n=lengths, picked=st.lists(st.tuples(st.sampled_from(OPTIONS), numbers), max_size=3))
def test_random_generate_options(n, picked, tiny_models) -> None:
    args = [a for pair in picked for a in pair]
    r = chargen("generate", "the", "--model", str(tiny_models.int8), "--no-stop-at-eot", "-n", n, *args)
    assert_clean(r)


@CLI_EXAMPLES
@given(batch=numbers, threads=numbers, text=st.text(max_size=40))
def test_random_eval_options_and_text(batch, threads, text, tiny_models, tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_clean(chargen("eval", str(path), "--model", str(tiny_models.int8),
                         "--batch-size", batch, "--threads", threads))


# ---------------------------------------------------------------------------- model metadata

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def metadata_edit(tiny_models) -> st.SearchStrategy[tuple[str, str]]:
    """One chargen.* key and a new value for it: a config or tokenizer field changed to a
    random JSON value, or the whole entry replaced by random text."""
    cfg = {**tiny_models.model.cfg.to_dict(), "num_params": 1}
    tok = tiny_models.tokenizer.describe()
    field = lambda base: st.tuples(st.sampled_from(sorted(base)), json_values).map(  # noqa: E731
        lambda kv: json.dumps({**base, kv[0]: kv[1]}))
    return st.one_of(
        st.tuples(st.just("chargen.config"), field(cfg)),
        st.tuples(st.just("chargen.tokenizer"), field(tok)),
        st.tuples(st.sampled_from(["chargen.config", "chargen.tokenizer", "chargen.metrics",
                                   "chargen.format", "chargen.precision"]), st.text(max_size=12)),
    )


@CLI_EXAMPLES
@given(data=st.data())
def test_random_metadata_edits(data, tiny_models, tmp_path) -> None:
    key, value = data.draw(metadata_edit(tiny_models))
    proto = onnx.load(str(tiny_models.int8))
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    for args in (("info", "--json"), ("generate", "the", "-n", "5", "--seed", "1")):
        r = chargen(*args, "--model", str(path))
        assert_clean(r)
        if r.returncode:
            assert "re-export" in r.stderr or "upgrade" in r.stderr or "not a chargen model" in r.stderr


# ---------------------------------------------------------------------------- params


def leaf_keys(cls: type = Params, prefix: str = "") -> list[str]:
    """Every params key, dotted; a list of sources counts as one key."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{key}.")
        else:
            keys.append(key)
    return keys


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(leaf_keys()), value=yaml_values)
def test_random_params_values_load_or_fail_in_one_line(key, value, tmp_path) -> None:
    raw = project_params()
    section, name = key.split(".", 1)
    raw[section][name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    try:
        load_params(path)
    except ParamsError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 400
        assert section in message


def test_params_in_a_stage_fail_before_anything_is_written(tmp_path) -> None:
    raw = project_params()
    raw["encode"]["out_dir"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = run_stage_script("encode", tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "error: encode.out_dir: must not be empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("export.opset", 23, "export.opset: must be >= 24 and <= 25, got 23"),
    ("quantize.int4_block_size", 512, "quantize.int4_block_size: must be >= 16 and <= 256, got 512"),
    ("sample.temperature", 1e-30, "sample.temperature: must be >= 1e-06, got 1e-30"),
    ("train.seed", 2**64, f"train.seed: must be >= 0 and <= {2**63 - 1:g}, got {2**64}"),
    ("train.threads", -1, "train.threads: must be >= 0, got -1"),
    ("report.png_scale", 1000, "report.png_scale: must be >= 0.25 and <= 8, got 1000.0"),
])
def test_params_that_would_fail_deep_in_a_stage_are_refused_on_load(key, value, message, tmp_path) -> None:
    raw = project_params()
    section, name = key.split(".")
    raw[section][name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert str(e.value) == message


def test_an_output_that_cannot_be_created_is_one_line(tmp_path) -> None:
    write_corpus(tmp_path / "data" / "raw", [("a.txt", TINY_TEXT)])
    raw = project_params()
    raw["encode"]["out_dir"] = "params.yaml/encoded"  # a file in the way
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = run_stage_script("encode", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: cannot create the folder params.yaml (a file is in the way); set a writable place in params.yaml"]


def test_training_checks_its_output_folders_before_the_first_step(tmp_path) -> None:
    write_encoded(tmp_path / "data" / "encoded", tiny_tokenizer())
    raw = project_params()
    raw["train"]["out_dir"] = "params.yaml/checkpoints"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = run_stage_script("train", tmp_path)
    assert r.returncode == 1 and r.stdout == ""  # not one step ran
    assert r.stderr.strip().splitlines() == [
        "error: cannot create the folder params.yaml/checkpoints (a file is in the way); "
        "set a writable place in params.yaml"]


def test_more_training_threads_than_cores_are_refused() -> None:
    from pipeline.training.device import set_threads

    cores = os.cpu_count() or 1
    with pytest.raises(ChargenError, match=f"train.threads: {cores + 1} threads, but this machine has {cores} cores"):
        set_threads(cores + 1)


@pytest.mark.parametrize("allocate", ["numpy", "torch"])
def test_a_stage_out_of_memory_is_one_line(allocate, capsys) -> None:
    import numpy as np
    import torch

    def main() -> None:  # 1 PiB: more than any address space
        np.empty(1 << 50, dtype=np.uint8) if allocate == "numpy" else torch.empty(1 << 50, dtype=torch.uint8)

    with pytest.raises(SystemExit) as e:
        run_stage(main)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not enough memory (") and err.count("\n") == 1
    assert err.endswith("; make the run smaller in params.yaml (a batch size, the model's size, the n-gram tables)\n")


# ---------------------------------------------------------------------------- found by hand


def test_eval_of_a_file_and_of_stdin_agree_on_crlf_text(tiny_models, tmp_path) -> None:
    text = tiny_models.text[:300].replace("\n", "\r\n")
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode())
    model = ("--model", str(tiny_models.fp32), "--json")
    from_file = chargen("eval", str(path), *model)
    from_stdin = chargen("eval", "-", *model, stdin=text)
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    a, b = json.loads(from_file.stdout)["results"][0], json.loads(from_stdin.stdout)["results"][0]
    assert a["loss"] == b["loss"] and a["chars"] == b["chars"]
    assert "warning" not in from_stdin.stderr  # no '\r' read as an unknown character


def test_invalid_utf8_on_stdin_is_refused_under_a_c_locale(tiny_models) -> None:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    r = subprocess.run([sys.executable, "-m", "chargen", "generate", "-", "--model", str(tiny_models.int8)],
                       input=b"caf\xe9 au lait", capture_output=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        "error: the prompt from stdin is not UTF-8 text (byte 3); convert it first (e.g. iconv -t utf-8)"]


def test_a_full_disk_is_one_line(tiny_models) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "chargen", "generate", "the", "-n", "50",
                            "--model", str(tiny_models.int8)], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: cannot write the output (No space left on device); free some disk space or write somewhere else"]


def test_ctrl_c_before_a_command_starts_is_one_line(monkeypatch, capsys) -> None:
    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt  # as when Ctrl-C lands while the heavy imports run

    monkeypatch.setattr(cli, "app", interrupted)
    handler = signal.getsignal(signal.SIGINT)  # entry.main installs its own
    try:
        with pytest.raises(SystemExit) as e:
            entry.main()
    finally:
        signal.signal(signal.SIGINT, handler)
    assert e.value.code == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"


# Sends the process itself Ctrl-C when the named module is first imported: a real signal
# at a known point of start-up.
INTERRUPT_DURING_IMPORT = """
import os, signal, sys
module, model = sys.argv[1:]
sent = []
def hook(event, args):
    if event == "import" and args[0] == module and not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.argv = ["chargen", "info", "--model", model]
from chargen.entry import main
main()
"""


@pytest.mark.parametrize("module", ["typer", "numpy", "onnxruntime"])
def test_ctrl_c_while_the_command_line_loads_is_one_line(module, tiny_models) -> None:
    """typer and numpy load with the command line, ONNX Runtime with the model."""
    r = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_IMPORT, module, str(tiny_models.int8)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (130, "interrupted\n")


@pytest.mark.parametrize(("fd", "args", "message"), [
    (0, ("generate", "-", "-n", "5"), "error: standard input is closed; pipe the text in (e.g. cat FILE | chargen ...)"),
    (0, ("eval", "-"), "error: standard input is closed; pipe the text in (e.g. cat FILE | chargen ...)"),
    (1, ("info",), "error: standard output is closed; redirect it (to a file or /dev/null)"),
    (1, ("generate", "the", "-n", "5"), "error: standard output is closed; redirect it (to a file or /dev/null)"),
])
def test_a_closed_standard_stream_is_one_line(fd, args, message, tiny_models) -> None:
    """As the shell leaves them after `<&-` or `>&-`: the stream is None in Python."""
    r = subprocess.run([sys.executable, "-m", "chargen", *args, "--model", str(tiny_models.int8)],
                       stdout=None if fd == 1 else subprocess.PIPE, stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.close(fd), text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [message]


def test_an_unreadable_text_is_named_as_the_input(tiny_models) -> None:
    """A read error (EIO) is the input's, not a failure to write the output."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("no /proc/self/mem on this system")
    r = chargen("eval", "/proc/self/mem", "--model", str(tiny_models.int8))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: cannot read /proc/self/mem (Input/output error)"]


def test_running_out_of_memory_is_one_line(capsys) -> None:
    import numpy as np
    import typer

    with pytest.raises(typer.Exit) as e:
        cli.run_command(lambda: np.empty(1 << 50, dtype=np.uint8))  # 1 PiB: more than any address space
    assert e.value.exit_code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: not enough memory (Unable to allocate 1.00 PiB") and err.count("\n") == 1
    assert err.endswith("; ask for less: a smaller --batch-size or --num-samples\n")


def test_model_paths_and_settings_found_by_hand(tiny_models, tmp_path) -> None:
    model = ("--model", str(tiny_models.int8))
    not_regular = chargen("info", "--model", "/dev/null")
    assert not_regular.returncode == 1
    assert not_regular.stderr.strip() == "error: model file /dev/null is not a regular file"
    named = chargen("bench", "--fp32", str(tmp_path / "none.onnx"), "--chars", "1", "--repeats", "1")
    assert named.returncode == 2  # a path the user typed is a mistake, not a model to skip
    assert named.stderr.strip() == f"error: model file {tmp_path / 'none.onnx'} (from --fp32) does not exist"
    empty = chargen("eval", "", *model)
    assert empty.returncode == 1
    assert empty.stderr.strip() == "error: the file name is empty; give a text file, or '-' to read stdin"
    cold = chargen("generate", "the", "-t", "1e-320", *model)  # 1 / t overflows
    assert_clean(cold)
    assert cold.returncode == 2 and "must be a finite number >= 1e-06" in cold.stderr
    greedy = chargen("generate", "the", "-t", "1e-6", "-n", "20", "--top-k", "3", "--no-stop-at-eot", *model)
    assert greedy.returncode == 0 and greedy.stderr == "" and len(greedy.stdout) == 20


def test_a_corrupt_context_length_is_refused_before_any_allocation(tiny_models, tmp_path) -> None:
    m = onnx.load(str(tiny_models.int8))
    for prop in m.metadata_props:
        if prop.key == contract.META_CONFIG:
            prop.value = json.dumps({**json.loads(prop.value), "block_size": 10**9})
    path = tmp_path / "long.onnx"
    onnx.save(m, str(path))
    r = chargen("generate", "the", "-n", "3", "--model", str(path))
    assert_clean(r)
    assert r.returncode == 1 and "config block_size 1000000000 is above 65536" in r.stderr


def test_stale_temporaries_of_killed_writers_are_cleared(tmp_path) -> None:
    """A writer killed with -9 leaves its temporary; the next write of that output removes
    it, but never the temporary of a writer that still runs."""
    raw = project_params()
    raw["download"].update(sources=[{"name": "local", "path": "corpus"}], out_dir="raw")
    raw["encode"]["out_dir"] = "encoded"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat.\n" * 40)
    assert run_stage_script("download", tmp_path).returncode == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".encoded.{dead}.abc123.tmp"
        running = tmp_path / f".encoded.{alive.pid}.def456.tmp"
        for d in (stale, running):
            d.mkdir()
            (d / "train.bin").write_bytes(b"\0" * 1000)
        r = run_stage_script("encode", tmp_path)
        assert r.returncode == 0, r.stderr
        assert not stale.exists() and running.exists()
    finally:
        alive.kill()


def test_long_error_details_are_cut_at_a_word() -> None:
    text = "weights do not fit " * 20
    clipped = _clip(text, 60)
    assert clipped.endswith(" ...") and len(clipped) <= 64
    assert clipped[:-4] == text[: len(clipped) - 4] and text[len(clipped) - 4] == " "


def test_a_corrupt_checkpoint_message_is_whole_words(tmp_path) -> None:
    from pipeline.training.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "best.pt"
    path.write_bytes(b"PK\x03\x04" + b"x" * 500)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    detail = str(e.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert detail.endswith(" ...") or len(detail) <= 120

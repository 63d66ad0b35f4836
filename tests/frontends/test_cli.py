"""The ``clex-serve`` command as a user runs it: a real subprocess, its output and exit status."""

import os
import re
import subprocess
import sys

import pytest

from helpers.models import model_with_tokenizer


def run_cli(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "clex_serve.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,  # a first load may build the C++ kernels: minutes on a slow machine
        env={**os.environ, **(env or {})},
    )


def test_generate_streams_a_completion(tmp_path):
    folder = model_with_tokenizer("llama", tmp_path)
    result = run_cli(
        "generate", "--model", str(folder), "--device", "cpu", "--max-tokens", "8", stdin="CLEX scales\ndef generate\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(lines)
    assert "Loading weights" not in result.stderr  # no progress bar for a load that takes no time


@pytest.mark.parametrize("flag", ["--max-num-seqs", "--decode-run-steps"])
def test_bad_flag_is_named_without_a_traceback(flag):
    result = run_cli("generate", flag, "0")
    assert result.returncode == 2
    assert f"argument {flag}: must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_offline_hub_id_gives_one_line(tmp_path):
    result = run_cli(
        "generate",
        "--model",
        "DAMO-NLP-SG/CLEX-7B-Chat-16K",
        "--prompt",
        "hi",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "DAMO-NLP-SG/CLEX-7B-Chat-16K" in line and "--model DIR" in line


def test_gpu_flags_reach_the_engine_config():
    import argparse

    from clex_serve.cli.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(
        parser.parse_args(
            ["--enforce-eager", "--gpu-memory-utilization", "0.5", "--load-format", "dummy", "--threads", "1"]
        )
    )
    assert config.enforce_eager and config.gpu_memory_utilization == 0.5 and config.load_format == "dummy"
    assert config.threads == 1
    defaults = engine_config_from_args(parser.parse_args([]))
    assert not defaults.enforce_eager and defaults.gpu_memory_utilization == 0.9 and defaults.load_format == "auto"


def test_gpu_memory_utilization_above_one_is_refused_in_one_line():
    result = run_cli("generate", "--gpu-memory-utilization", "1.5", "--prompt", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --gpu-memory-utilization: must be in (0, 1], got 1.5" in result.stderr.strip().splitlines()[-1]


def test_unreachable_hub_gives_the_one_line_hint_quickly(tmp_path):
    """No HF_HUB_OFFLINE, and a hub endpoint that refuses connections (a closed port on 127.0.0.1): the
    command ends within 10 s in one line that names the id and the way out."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0"}
    started = time.monotonic()
    result = run_cli("generate", "--model", "DAMO-NLP-SG/CLEX-7B-16K", "--prompt", "hi", env=env)
    assert time.monotonic() - started < 10
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "DAMO-NLP-SG/CLEX-7B-16K" in line and "--model DIR" in line


def test_the_readme_generate_example_writes_code():
    """The README's `clex-serve generate` line on the embedded model (a chat model that knows Python's
    standard library): lines of code, not a sentence ended at once by the end token."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [prompt] = re.findall(r'`clex-serve generate --prompt "([^"]+)"`', readme)
    result = run_cli("generate", "--prompt", prompt)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 5 and len(result.stdout.split()) >= 20


def test_ignore_eos_writes_every_token():
    result = run_cli("generate", "--prompt", "Once upon a time", "--max-tokens", "24", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20  # without it, the chat model ends after "."


def test_a_port_in_use_is_one_line_before_the_model_loads():
    """A real listening socket on 127.0.0.1 holds the port. The model folder does not exist: the port is
    checked before it (a load would have failed on the folder), and stdout never announces a server."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for model_args in (["--model", "/no/such/model"], []):
            result = run_cli("--port", str(port), *model_args)
            assert result.returncode != 0 and "Traceback" not in result.stderr
            [line] = result.stderr.strip().splitlines()
            assert f"port {port} is already in use on 127.0.0.1" in line and "--port" in line
            assert "serving" not in result.stdout and "no such" not in line


HELP_COMMANDS = [["serve"], ["generate"], ["chat"], ["web"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda command: command[0])
def test_help_says_each_default_once(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # help entries wrap across lines
    assert "(default: None)" not in text and "(default: )" not in text and "(default: [])" not in text
    assert not re.search(r"\bdefault\b[^()]*\)\s*\(default:", text)  # "(default: X) (default: Y)"
    assert "2048 on CUDA (default" not in text and "max(max-model-len, 2048) (default" not in text
    if command == ["serve"]:
        assert "--uvicorn-log-level {critical,error,warning,info,debug,trace} how much uvicorn" in text
        assert "(default: no limit)" in text  # --max-queued-requests
        assert "(default: 8000)" in text  # defaults the help does not mention are still shown


def test_float16_on_the_cpu_is_warned_about_by_name():
    result = run_cli("generate", "--dtype", "float16", "--device", "cpu", "--prompt", "def f(x):", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning.startswith("clex-serve: warning: --dtype float16 on the CPU") and "float32" in warning
    quiet = run_cli("generate", "--dtype", "bfloat16", "--device", "cpu", "--prompt", "def f(x):", "--max-tokens", "2")
    assert "warning" not in quiet.stderr


def test_a_tokenizer_with_ids_past_the_vocabulary_is_refused_at_load(tmp_path):
    """The model reads 320 token ids; a tokenizer of 400 is refused in one line that names both sizes,
    before any request. A smaller tokenizer (many real checkpoints pad their embedding) is fine."""
    from helpers.models import word_level_tokenizer

    folder = model_with_tokenizer("llama", tmp_path)
    big, small = tmp_path / "big_tokenizer", tmp_path / "small_tokenizer"
    word_level_tokenizer(400).save_pretrained(big)
    word_level_tokenizer(300).save_pretrained(small)
    refused = run_cli(
        "generate",
        "--model",
        str(folder),
        "--tokenizer",
        str(big),
        "--device",
        "cpu",
        "--prompt",
        "CLEX",
        "--max-tokens",
        "2",
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "has 400 tokens (ids up to 399)" in line and "vocabulary has 320" in line and "--tokenizer" in line
    accepted = run_cli(
        "generate",
        "--model",
        str(folder),
        "--tokenizer",
        str(small),
        "--device",
        "cpu",
        "--prompt",
        "CLEX",
        "--max-tokens",
        "2",
    )
    assert accepted.returncode == 0, accepted.stderr

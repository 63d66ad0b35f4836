"""``clex-chat`` driven as a user drives it: through a pseudo-terminal (pexpect), from a pipe, and as a client
of a live ``clex-serve`` on 127.0.0.1. Every wait is bounded by pexpect's timeout."""

import json
import re
import subprocess
import sys

import pexpect
import pytest

from helpers.models import model_with_tokenizer, slow_random_llama
from helpers.scripted_server import CODE_ANSWER, scripted_server
from helpers.servers import running_server

CHAT = [sys.executable, "-m", "clex_serve.cli.chat"]
QUESTION = "What does json.dumps do?"
# Every wait that may include the model's first load: on a slow machine that loads right after the C++
# kernels changed, building them takes minutes. A bound, not a pace: a healthy chat answers in seconds.
LOAD_BOUND = 600


def spawn(*args, timeout=LOAD_BOUND):
    child = pexpect.spawn(
        CHAT[0],
        CHAT[1:] + list(args),
        encoding="utf-8",
        timeout=timeout,
        dimensions=(40, 160),
        env={"TERM": "dumb", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    return child


def test_piped_stdin_gets_an_answer():
    result = subprocess.run(
        CHAT + ["--temperature", "0", "--max-new-tokens", "20"],
        input=QUESTION + "\n",
        capture_output=True,
        text=True,
        timeout=LOAD_BOUND,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ASSISTANT:") and len(result.stdout.split()) > 2


def test_a_turn_streams_and_every_command_works(tmp_path):
    saved = tmp_path / "conversation.json"
    child = spawn("--style", "simple", "--temperature", "0", "--max-new-tokens", "24", "--system", "Be brief.")
    child.expect_exact("USER: ")
    child.sendline(QUESTION)
    child.expect(r"ASSISTANT: (.+)\r\n")
    first_answer = child.match.group(1).strip()
    assert first_answer
    child.expect_exact("USER: ")
    child.sendline("!!help")
    for command in ("!!exit", "!!reset", "!!remove", "!!regen", "!!save", "!!load"):
        child.expect_exact(command)
    child.expect_exact("USER: ")
    child.sendline("!!regen")  # greedy: the same answer again
    child.expect(r"ASSISTANT: (.+)\r\n")
    assert child.match.group(1).strip() == first_answer
    child.expect_exact("USER: ")
    child.sendline(f"!!save {saved}")
    child.expect_exact("(saved 3 messages")
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == QUESTION and messages[2]["content"].strip() == first_answer
    child.sendline("!!remove")
    child.expect_exact("(the last turn is gone)")
    child.sendline("!!remove")
    child.expect_exact("(nothing to remove)")
    child.sendline("!!reset")
    child.expect_exact("(a new conversation)")
    child.sendline(f"!!load {saved}")
    child.expect_exact("(loaded 3 messages")
    child.sendline(f"!!save {saved}.again")
    child.expect_exact("(saved 3 messages")
    assert json.loads((tmp_path / "conversation.json.again").read_text()) == messages
    child.sendline("!!load /no/such/file.json")
    child.expect_exact("(cannot load /no/such/file.json")
    child.sendline("!!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_mid_answer_returns_to_the_prompt_with_the_engine_idle(tmp_path):
    """A model that writes hundreds of tokens: Ctrl-C after the first ones stops it, the engine is idle, and
    the chat goes on."""
    folder = model_with_tokenizer("llama", tmp_path)
    child = spawn(
        "--model",
        str(folder),
        "--style",
        "simple",
        "--chat-template",
        "vicuna",
        "--temperature",
        "0",
        "--max-model-len",
        "1024",
        "--allow-long-max-model-len",
        "--max-new-tokens",
        "900",
    )
    child.expect_exact("USER: ")
    child.sendline("Tell me a long story")
    child.expect_exact("ASSISTANT: ")
    child.expect(r"\S{8}")  # some of the answer has been written
    child.sendintr()
    child.expect_exact("(stopped; the engine is idle)")
    child.expect_exact("USER: ")
    child.sendline("!!save " + str(tmp_path / "after.json"))
    child.expect_exact("(saved 2 messages")
    kept = json.loads((tmp_path / "after.json").read_text())[1]["content"]
    assert kept  # the conversation keeps what was shown
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _screen_until(child, screen, stream, done, what: str):
    """Feed the child's output to a terminal emulator until ``done(screen text)``; pexpect's timeout bounds
    every read."""
    while not done("\n".join(screen.display)):
        try:
            stream.feed(child.read_nonblocking(4096, timeout=child.timeout))
        except pexpect.TIMEOUT:
            raise AssertionError(f"the screen never showed {what}:\n" + "\n".join(screen.display)) from None


@pytest.mark.slow
def test_ctrl_c_in_the_rich_chat_leaves_each_line_of_the_answer_on_screen_once(tmp_path):
    """A real terminal (xterm, 40x120) as a user sees it, through a terminal emulator: Ctrl-C while an
    answer several lines long is drawn leaves exactly what the conversation kept, with no line twice (the
    echoed ^C used to move the cursor under rich's redraw, which then left the first line a second time)."""
    pyte = pytest.importorskip("pyte")
    folder = slow_random_llama(tmp_path)  # words, at a pace that keeps the answer streaming
    rows, columns = 40, 120
    child = pexpect.spawn(
        CHAT[0],
        CHAT[1:]
        + [
            "--model",
            str(folder),
            "--chat-template",
            "vicuna",
            "--temperature",
            "0",
            "--max-model-len",
            "4096",
            "--max-new-tokens",
            "3000",
            "--history-file",
            str(tmp_path / "history"),
        ],
        encoding="utf-8",
        timeout=LOAD_BOUND,
        dimensions=(rows, columns),
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    screen = pyte.Screen(columns, rows)
    stream = pyte.Stream(screen)
    _screen_until(child, screen, stream, lambda text: "USER" in text, "the prompt")
    child.sendline("Tell me a long story")

    def answer_lines(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.split("\n")]
        start = next(i for i, line in enumerate(lines) if line.startswith("ASSISTANT"))
        return [line for line in lines[start + 1 :] if line][:-1]  # the last may still be growing

    _screen_until(
        child,
        screen,
        stream,
        lambda text: "ASSISTANT" in text and len(answer_lines(text)) >= 2,
        "two lines of the answer",
    )
    child.sendintr()
    _screen_until(child, screen, stream, lambda text: "(stopped" in text, "the stop notice")
    lines = [line.rstrip() for line in screen.display]
    start = next(i for i, line in enumerate(lines) if line.startswith("ASSISTANT"))
    stop = next(i for i, line in enumerate(lines) if line.startswith("(stopped"))
    on_screen = " ".join(" ".join(lines[start + 1 : stop]).split())

    child.sendline(f"!!save {tmp_path / 'kept.json'}")
    child.expect_exact("(saved 2 messages")
    kept = json.loads((tmp_path / "kept.json").read_text())[1]["content"]
    assert on_screen == " ".join(kept.split())
    child.sendline("!!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_code_in_an_answer_reads_as_code_in_the_rich_chat(tmp_path):
    """A server that answers with code, unfenced and fenced, a few characters at a time; the terminal
    (through an emulator) shows every identifier's underscores, the comments as comments, the indentation."""
    pyte = pytest.importorskip("pyte")
    rows, columns = 40, 120
    with scripted_server(CODE_ANSWER) as url:
        child = pexpect.spawn(
            CHAT[0],
            CHAT[1:] + ["--url", url, "--history-file", str(tmp_path / "history")],
            encoding="utf-8",
            timeout=60,
            dimensions=(rows, columns),
            env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        )
        screen = pyte.Screen(columns, rows)
        stream = pyte.Stream(screen)
        _screen_until(child, screen, stream, lambda text: "USER" in text, "the prompt")
        child.sendline("How do I write a class?")
        _screen_until(child, screen, stream, lambda text: "That is __init__ and emphasis." in text, "the answer")
        lines = [line.rstrip() for line in screen.display]
        assert any(line.startswith("Use __init__ to set up an object, as in snake_case_names:") for line in lines)
        header = next(line for line in lines if line.strip() == "class Reader:")
        comment = next(line for line in lines if line.strip() == "# set up the _private state")
        assert comment.index("#") == header.index("c") + 4
        assert any(line.strip() == "def __init__(self, file_name):" for line in lines)
        assert any(line.strip() == "# read it all" for line in lines)
        child.sendline("!!exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def test_rich_style_in_a_terminal(tmp_path):
    child = spawn("--temperature", "0", "--max-new-tokens", "16", "--history-file", str(tmp_path / "history"))
    child.expect("USER")
    child.sendline(QUESTION)
    child.expect("ASSISTANT")
    child.expect("USER")
    child.sendline("!!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_client_mode_and_a_wrong_api_key():
    with running_server("--api-key", "secret") as (url, _):
        child = spawn(
            "--url",
            f"{url}/v1",
            "--api-key",
            "secret",
            "--style",
            "simple",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        )
        child.expect_exact("USER: ")
        child.sendline(QUESTION)
        child.expect(r"ASSISTANT: (.+)\r\n")
        assert child.match.group(1).strip()
        child.sendline("!!exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

        wrong = subprocess.run(
            CHAT + ["--url", f"{url}/v1", "--api-key", "wrong"], capture_output=True, text=True, timeout=60, input=""
        )
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
        [line] = wrong.stderr.strip().splitlines()
        assert "refused the API key" in line and "--api-key" in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
        (["--style", "fancy"], "argument --style: invalid choice: 'fancy'"),
        (["--url", "http://127.0.0.1:9/v1"], "cannot reach a server at http://127.0.0.1:9/v1"),
        (["--temperature", "-1"], "temperature must be non-negative, got -1.0"),
    ],
)
def test_bad_flags_are_one_line(args, message):
    result = subprocess.run(CHAT + args, capture_output=True, text=True, timeout=60, input="")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_a_conversation_too_long_for_the_context_drops_its_oldest_turns(tmp_path):
    """A 400-token context and four turns of 60-token answers: before the turns that would overflow, the
    chat says so and (a pipe answers yes) drops the oldest turns, and every message still gets an answer."""
    folder = model_with_tokenizer("llama", tmp_path)
    result = subprocess.run(
        CHAT
        + [
            "--model",
            str(folder),
            "--chat-template",
            "vicuna",
            "--temperature",
            "0",
            "--max-model-len",
            "400",
            "--allow-long-max-model-len",
            "--max-new-tokens",
            "60",
        ],
        input="Tell me a story\nAnd another one\nOne more please\nAnd the last one\n",
        capture_output=True,
        text=True,
        timeout=LOAD_BOUND,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ASSISTANT:") == 4
    # The question counts the answer's room in: 60 tokens (--max-new-tokens, at most a quarter of 400).
    assert re.search(
        r"The conversation \(\d+ tokens\) and the 60 tokens kept for the answer do not fit the "
        r"context of 400\. Drop the oldest turn\? \[Y/n\] y",
        result.stdout,
    )


def _main_dependency_closure() -> set[str]:
    """The distributions a plain `pip install .` brings: pyproject's main dependencies and, recursively, what
    they require outside extras."""
    import importlib.metadata as metadata
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pending = [Requirement(text) for text in pyproject["project"]["dependencies"]]
    closure: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in closure or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        closure.add(name)
        try:
            pending += [Requirement(text) for text in metadata.requires(requirement.name) or []]
        except metadata.PackageNotFoundError:
            pass  # not installed here (a platform's optional dependency): nothing can import it anyway
    return closure


def test_client_mode_needs_only_the_main_dependencies():
    """`clex-chat --url` as on a plain `pip install .`: every module of a distribution outside the main
    dependencies (test and web extras, whatever else is installed here) is made unimportable, and client
    mode still gets as far as trying the server. (It once failed there: "No module named 'httpx'".)"""
    import importlib.metadata as metadata

    from packaging.utils import canonicalize_name

    closure = _main_dependency_closure()
    hidden = sorted(
        module
        for module, distributions in metadata.packages_distributions().items()
        if module.isidentifier()
        and module not in sys.stdlib_module_names
        and module != "clex_serve"
        and not {canonicalize_name(name) for name in distributions} & closure
    )
    assert "pexpect" in hidden  # a test extra: the probe does hide what a plain install lacks
    # Hidden from imports and from importlib.util.find_spec, which optional imports ask first.
    probe = (
        "import importlib.util, sys\n"
        "names = set(sys.argv[1].split(','))\n"
        "class Hidden:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hidden())\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, package=None: (\n"
        "    None if name.split('.')[0] in names else find_spec(name, package))\n"
        "from clex_serve.cli.chat import main\n"
        "main(['--url', 'http://127.0.0.1:9/v1'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, ",".join(hidden)], capture_output=True, text=True, timeout=60, input=""
    )
    assert "No module named" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2 and "cannot reach a server at http://127.0.0.1:9/v1" in result.stderr

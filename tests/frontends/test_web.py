"""The Gradio demo in a real headless Chromium (Debian's ``chromium``, driven by Playwright): mounted on
``clex-serve --ui``, and standalone against a live server. Waits are bounded; nothing leaves 127.0.0.1."""

import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from helpers.models import slow_random_llama
from helpers.scripted_server import CODE_ANSWER, scripted_server
from helpers.servers import free_port, running_server

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package"),
]

QUESTION = "What does json.dumps do?"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_ui(browser, url: str):
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(url, wait_until="domcontentloaded", timeout=60000)
    page.locator("#message textarea").wait_for(timeout=60000)
    return page


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def set_slider(page, slider: str, value: str) -> None:
    """Type into a settings slider's number box; leaving the box commits it. Waits until the slider holds it
    (a message sent before that would race the setting), typing again while it does not: on a loaded
    machine a first entry can land before the page is ready for it."""
    box = page.locator(f"{slider} input[type=number]")

    def committed() -> bool:
        if page.locator(f"{slider} input[type=range]").input_value() == value:
            return True
        box.fill(value)
        box.press("Tab")
        return False

    wait_for(committed, timeout=60, interval=0.5)


def bot_text(page) -> str:
    answers = page.locator('#conversation [data-testid="bot"]')
    return answers.last.inner_text() if answers.count() else ""


def wait_for(condition, timeout: float = 60, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE).group(1))


def answer_settled(page, timeout: float = 60) -> str:
    """The last answer once it has stopped changing for a while."""
    last, stable_since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = bot_text(page)
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and time.monotonic() - stable_since > 1.5:
            return text
        time.sleep(0.1)
    raise AssertionError("the answer never settled")


def test_answer_streams_and_stop_frees_the_engine(browser, tmp_path):
    """A model that writes thousands of tokens: the answer grows across reads, Stop ends it while the request
    is still running, and /metrics shows no request running and no KV block in use."""
    folder = slow_random_llama(tmp_path)
    with running_server("--model", str(folder), "--chat-template", "vicuna", "--max-model-len", "8192", "--ui") as (
        url,
        _,
    ):
        page = open_ui(browser, f"{url}/ui/")
        # Greedy, so that this random model never picks its end token (sampled, when it stops depends on the
        # draws), the longest answer the page allows, and a model of 25M parameters: the answer takes tens of
        # seconds (the 2-layer test checkpoint wrote 4,096 tokens in a few, so the page could still be
        # showing them after the engine had finished, and Stop found nothing running).
        page.locator("#settings").get_by_text("Settings").click()
        set_slider(page, "#temperature", "0")
        set_slider(page, "#max-new-tokens", "4096")
        send(page, "Tell me a long story")
        first = wait_for(lambda: len(bot_text(page)) > 5 and bot_text(page))
        second = wait_for(lambda: len(bot_text(page)) > len(first) + 5 and bot_text(page))
        assert second.startswith(first[:5])
        assert metric(url, "clex_serve_requests_running") == 1  # Stop below interrupts a running answer
        page.locator("#stop").click()
        wait_for(
            lambda: metric(url, "clex_serve_requests_running") == 0 and metric(url, "clex_serve_kv_blocks_used") == 0,
            timeout=30,
        )
        stopped = bot_text(page)
        time.sleep(1.0)
        assert bot_text(page) == stopped  # nothing more arrives after Stop


def test_two_tabs_chat_at_once_without_mixing(browser, tmp_path):
    """Two browser contexts send at the same time; each sees only its own conversation. A message past the
    context limit gets a clear message in the chat. The page with an answer is saved as a screenshot."""
    with running_server("--ui") as (url, _):
        first, second = open_ui(browser, f"{url}/ui/"), open_ui(browser, f"{url}/ui/")
        send(first, QUESTION)
        send(second, "How do I read a file in Python?")
        answers = [answer_settled(first), answer_settled(second)]
        assert all(answers)
        users = [page.locator('#conversation [data-testid="user"]').all_inner_texts() for page in (first, second)]
        assert [text.strip() for text in users[0]] == [QUESTION]
        assert [text.strip() for text in users[1]] == ["How do I read a file in Python?"]
        # The status line counts the conversation's tokens and shows its CLEX scale (which one depends on how
        # long the sampled answer ran).
        assert re.search(r"Tokens: \d+ / \d+ · CLEX scale t = \d+", first.locator("#status").inner_text())
        screenshot = Path(os.environ.get("CLEX_SERVE_SCREENSHOT", tmp_path / "web-demo.png"))
        first.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000

        send(second, "word " * 3000)
        wait_for(lambda: "the model reads at most 2048" in bot_text(second))
        second.locator("#undo").click()
        wait_for(lambda: len(second.locator('#conversation [data-testid="user"]').all_inner_texts()) == 1)


def test_standalone_demo_against_a_live_server(browser):
    with running_server() as (url, _), standalone_demo(f"{url}/v1") as page_url:
        page = open_ui(browser, page_url)
        send(page, QUESTION)
        assert answer_settled(page)
        assert "Tokens:" in page.locator("#status").inner_text()


@contextmanager
def standalone_demo(url: str):
    """``clex-serve web --url URL`` on a free port; yields the page's address once it says where it is."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "clex_serve.cli.main", "web", "--url", url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "web UI" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
        assert "web UI" in line, process.stderr.read() if process.poll() is not None else line
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_code_in_an_answer_renders_as_code(browser):
    """An answer with code written without a fence and with one (streamed a few characters at a time): the
    page shows both as code blocks, comments as comments (no heading), identifiers with their underscores
    (no bold or italics), while the prose's own *emphasis* still renders."""
    with scripted_server(CODE_ANSWER) as url, standalone_demo(url) as page_url:
        page = open_ui(browser, page_url)
        send(page, "How do I write a class?")
        wait_for(lambda: "That is" in bot_text(page))
        answer = page.locator('#conversation [data-testid="bot"]').last
        wait_for(lambda: answer.locator("em").count() == 1)
        text = answer.inner_text()
        assert "Use __init__ to set up an object, as in snake_case_names:" in text
        blocks = answer.locator("pre").all_inner_texts()
        assert len(blocks) == 2, blocks
        assert "# set up the _private state" in blocks[0] and "def __init__(self, file_name):" in blocks[0]
        assert "    # set up the _private state" in blocks[0]  # indentation kept
        assert "# read it all" in blocks[1] and "def read_all(path_name):" in blocks[1]
        assert answer.locator("h1, h2, h3, h4, h5, h6, strong").count() == 0
        assert answer.locator("em").all_inner_texts() == ["emphasis"]


def test_ui_flag_without_gradio_says_what_to_install(tmp_path):
    """Without Gradio importable, --ui fails in one line that names the extra."""
    blocker = tmp_path / "gradio.py"
    blocker.write_text("raise ImportError('no gradio here')\n")
    result = subprocess.run(
        [sys.executable, "-m", "clex_serve.cli.main", "--ui", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install 'clex-serve[web]'" in result.stderr.strip().splitlines()[-1]


def test_ui_behind_an_api_key_asks_for_it():
    with running_server("--ui", "--api-key", "secret") as (url, _):
        assert '"auth_required":true' in httpx.get(f"{url}/ui/", timeout=30).text
        assert (
            httpx.post(f"{url}/ui/login", data={"username": "me", "password": "wrong"}, timeout=30).status_code == 400
        )
        assert (
            httpx.post(f"{url}/ui/login", data={"username": "me", "password": "secret"}, timeout=30).status_code == 200
        )

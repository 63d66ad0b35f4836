"""How an answer's markdown renders in the terminal (rich, as the chat draws it): code stays code, with or
without a fence, finished or still streaming, and the prose keeps its identifiers."""

from rich.console import Console
from rich.markdown import Markdown

from clex_serve.cli.answer_markdown import display_markdown
from helpers.scripted_server import CODE_ANSWER


def rendered(text: str) -> str:
    console = Console(width=100, color_system=None, force_terminal=False)
    with console.capture() as capture:
        console.print(Markdown(display_markdown(text)))
    return capture.get()


def test_code_reads_as_code_fenced_or_not():
    lines = [line.rstrip() for line in rendered(CODE_ANSWER).splitlines()]
    assert any(line.startswith("Use __init__ to set up an object, as in snake_case_names:") for line in lines)
    header = next(line for line in lines if line.strip() == "class Reader:")
    comment = next(line for line in lines if line.strip() == "# set up the _private state")
    body = next(line for line in lines if line.strip() == "self._file = file_name")
    assert len(comment) - len(comment.lstrip()) == len(header) - len(header.lstrip()) + 4  # indentation kept
    assert len(body) - len(body.lstrip()) == len(header) - len(header.lstrip()) + 8
    assert any(line.strip() == "# read it all" for line in lines)
    assert any(line.strip() == "def read_all(path_name):" for line in lines)
    assert any("That is __init__ and emphasis." in line for line in lines)  # a code span; * still emphasises


def test_every_streamed_prefix_keeps_underscores_and_hashes():
    """What the terminal shows at each step of the stream: no identifier loses an underscore to emphasis and
    no comment its # to a heading, also with a fence or a code span still open."""
    for end in range(1, len(CODE_ANSWER) + 1):
        prefix = CODE_ANSWER[:end]
        text = rendered(prefix)
        assert text.count("_") == prefix.count("_"), prefix
        assert text.count("#") == prefix.count("#"), prefix


def test_prose_headings_and_lists_stay_markdown():
    text = rendered("# Steps\n\n1. Open the file\n2. Read it\n\nIt returns **all** of it.")
    assert "# Steps" not in text and "Steps" in text  # a heading, not a comment
    assert "1 Open the file" in text or "1. Open the file" in text
    assert "**" not in text and "all" in text

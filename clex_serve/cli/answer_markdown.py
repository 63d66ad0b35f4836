"""A chat message as markdown that keeps code as code, for the terminal chat and the web page alike.

Markdown renderers read everything as prose: a Python ``# comment`` line becomes a heading, ``__init__`` a
bold "init", ``_private ... x_`` italics, and indented lines of code outside a fence flow into one paragraph.
Models often write code without a fence (the embedded one above all: it learned from the standard library's
source), and a streamed answer stops mid-fence at every step. So, before rendering:

- fenced blocks stay as written, and one still open (the answer is streaming) is closed;
- runs of lines that read as code, outside fences, get a fence of their own;
- in the prose that is left, underscores are escaped outside code spans: identifiers keep them, and models
  write emphasis with ``*``.

What the conversation holds, and what the model reads next turn, is the text as written, never this.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# Lines that open or are code whatever surrounds them: a definition, an import, a statement keyword, a
# decorator, an assignment, a call on its own, or a block header ending in a colon.
_CODE_LINE = re.compile(
    r"""^\s*(
        (async\s+)?def\s+\w+\s*\( | class\s+\w+\s*[(:]
      | import\s+[\w.]+ | from\s+[\w.]+\s+import\s
      | (if|elif|while|for|with|except)\b.*:\s*(\#.*)?$ | (else|try|finally)\s*:
      | (return|yield|raise|assert)(\s|$) | (pass|break|continue)\s*$
      | @[\w.]+ | [A-Za-z_][\w.]*(\[[^\]]*\])?\s*([-+*/%|&]?=)(?!=)\s*\S
      | [A-Za-z_][\w.]*\(.*\)\s*$
    )""",
    re.VERBOSE,
)
_INDENTED = re.compile(r"^(\t| {4})")
_COMMENT = re.compile(r"^\s*#")
# Complete code spans (a run of backticks closed by a run of the same length), and <scheme://...> autolinks,
# in neither of which a backslash escape is read.
_VERBATIM = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)|<[A-Za-z][\w+.-]*:[^\s<>]*>", re.DOTALL)
_UNESCAPED_UNDERSCORE = re.compile(r"(?<!\\)_")


def display_markdown(text: str) -> str:
    out: list[str] = []
    prose: list[str] = []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence:
            out.append(_prose_markdown(prose))
            prose = []
            end = _fence_end(lines, index, fence.group(1))
            block = lines[index : end + 1]
            if end == len(lines):  # still open: close it, so that what streamed so far shows as code
                block.append(fence.group(1))
            out.append("\n".join(block))
            index = end + 1
        else:
            prose.append(lines[index])
            index += 1
    out.append(_prose_markdown(prose))
    return "\n".join(part for part in out if part is not None)


def _fence_end(lines: list[str], start: int, opener: str) -> int:
    """The index of the line that closes the fence opened at ``start`` (``len(lines)`` when none does)."""
    closer = re.compile(rf"^ {{0,3}}{re.escape(opener[0])}{{{len(opener)},}}\s*$")
    for index in range(start + 1, len(lines)):
        if closer.match(lines[index]):
            return index
    return len(lines)


def _prose_markdown(lines: list[str]) -> str | None:
    """Lines outside fences: code runs fenced, underscores in the rest escaped."""
    if not lines:
        return None
    kinds = _line_kinds(lines)
    parts: list[str] = []
    index = 0
    while index < len(lines):
        end = index
        while end < len(lines) and kinds[end] == kinds[index]:
            end += 1
        block = "\n".join(lines[index:end])
        parts.append(f"```\n{block}\n```" if kinds[index] == "code" else _escape_underscores(block))
        index = end
    return "\n".join(parts)


def _line_kinds(lines: list[str]) -> list[str]:
    """ "code" for each line in a run that reads as code, "prose" for the others. A run starts at a line
    that is code on its own (or a comment right above one) and goes on through indented lines, comments,
    and blank lines that more code follows."""
    strong = [bool(_CODE_LINE.match(line)) for line in lines]
    kinds = ["prose"] * len(lines)
    in_code = False
    for index, line in enumerate(lines):
        next_index = next((j for j in range(index + 1, len(lines)) if lines[j].strip()), None)
        next_is_code = next_index is not None and (
            strong[next_index]
            or (in_code and (_INDENTED.match(lines[next_index]) or _COMMENT.match(lines[next_index])))
        )
        if strong[index]:
            in_code = True
        elif not line.strip():
            in_code = in_code and next_is_code
        elif _COMMENT.match(line):
            in_code = in_code or (next_index == index + 1 and strong[next_index])
        elif not (in_code and _INDENTED.match(line)):
            in_code = False
        kinds[index] = "code" if in_code else "prose"
    return kinds


def _escape_underscores(text: str) -> str:
    pieces, last = [], 0
    for span in _VERBATIM.finditer(text):
        pieces.append(_UNESCAPED_UNDERSCORE.sub(r"\\_", text[last : span.start()]))
        pieces.append(span.group(0))
        last = span.end()
    pieces.append(_UNESCAPED_UNDERSCORE.sub(r"\\_", text[last:]))
    return "".join(pieces)

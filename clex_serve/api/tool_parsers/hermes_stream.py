"""Hermes-style tool calls as they stream: OpenAI's deltas from text that arrives a few characters at a time."""

from __future__ import annotations

import json
import re

from clex_serve.api.tool_parsers.hermes import BEGIN, END, ToolCall, new_call_id, parse_call

# Where a call's arguments start, once its name is known (the constrained calls are written this way).
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class HermesToolStream:
    """Turns streamed text into OpenAI's deltas: ``content`` for text outside calls, and per call a first
    delta with its index, id and name, then the arguments as they arrive. Text that may be the start of
    ``<tool_call>`` is held back until it is known not to be."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.num_calls = 0
        self.calls: list[ToolCall] = []
        self._header_sent = False
        self._scanner: _JsonValueScanner | None = None
        self._arguments_sent = 0
        self._whitespace = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for the new ``text``; ``final``: the output has ended."""
        self.buffer += text
        content, deltas = [], []
        while True:
            if not self.in_call:
                start = self.buffer.find(BEGIN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self.buffer, BEGIN)
                    content.append(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    break
                content.append(self.buffer[:start])
                self.buffer = self.buffer[start + len(BEGIN) :]
                self.in_call, self._header_sent, self._scanner, self._arguments_sent = True, False, None, 0
            end = self.buffer.find(END)
            body = self.buffer if end < 0 else self.buffer[:end]
            deltas += self._call_deltas(body, done=end >= 0)
            if end < 0:
                if final:  # an unfinished call: what it was stays content
                    content.append(BEGIN + self.buffer if not self._header_sent else "")
                    self.buffer = ""
                break
            self.buffer = self.buffer[end + len(END) :]
            self.in_call = False
        return self._content("".join(content), final), deltas

    def _content(self, text: str, final: bool) -> str:
        """Whitespace around calls (the newlines between them) is not content: held until text follows."""
        if not self.num_calls:
            return text
        text = self._whitespace + text
        if text.strip():
            self._whitespace = ""
            return text
        self._whitespace = "" if final else text
        return ""

    def _call_deltas(self, body: str, done: bool) -> list[dict]:
        deltas = []
        if not self._header_sent:
            header = _HEADER.match(body)
            if header is not None and header.end() == len(body):
                header = None  # the whitespace before the arguments may go on: wait for their first character
            if header is None:
                if done:  # not in the streamable shape: the whole call at once, if it is one
                    call = parse_call(body.strip())
                    if call is not None:
                        deltas.append(self._start(call.name, call.arguments))
                        self.calls.append(call)
                        self._header_sent = True
                return deltas
            name = json.loads(f'"{header.group(1)}"')
            deltas.append(self._start(name, ""))
            self.calls.append(ToolCall(name, "", deltas[-1]["id"]))
            self._header_sent = True
            self._scanner = _JsonValueScanner(header.end())
        if self._scanner is not None:
            end = self._scanner.scan(body)
            fragment = body[self._scanner.start + self._arguments_sent : end]
            if fragment:
                self._arguments_sent += len(fragment)
                self.calls[-1].arguments += fragment
                deltas.append({"index": self.num_calls - 1, "function": {"arguments": fragment}})
        return deltas

    def _start(self, name: str, arguments: str) -> dict:
        self.num_calls += 1
        return {
            "index": self.num_calls - 1,
            "id": new_call_id(),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }


class _JsonValueScanner:
    """Finds where one JSON value that starts at ``start`` ends, reading text as it grows."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.position = start
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.ended = False

    def scan(self, text: str) -> int:
        """The end (exclusive) of the value read so far: all of ``text`` until the value is complete."""
        while not self.ended and self.position < len(text):
            char = text[self.position]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.ended = True
            self.position += 1
        return self.position


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0

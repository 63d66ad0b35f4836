"""Grammars compiled once per constraint, off the engine thread.

xgrammar (vLLM's and SGLang's default backend) compiles a constraint against the tokenizer's vocabulary
into a grammar whose token masks take microseconds per step; the measurement behind the choice over
llguidance is ``bench/structured_benchmark.py``. Compiling runs where requests are checked
(``InputProcessor.process``, which the asyncio engine runs in a worker thread), so a slow schema delays its
own request only; xgrammar's compiler releases the GIL while it works and keeps the compiled grammars in
a cache bounded in bytes, so a schema sent again costs a lookup.

The tokenizer's token table is built on the first constrained request (70 ms for a vocabulary of 32,000),
not at start-up: a server that never sees one never pays it.
"""

from __future__ import annotations

import json
import re
import threading

from clex_serve.structured_outputs import StructuredOutputsParams

# Compiled grammars kept for reuse, in bytes: about a thousand JSON schemas of a few fields on a vocabulary
# of 32,000 (each holds its token-mask cache).
CACHE_LIMIT_BYTES = 256 << 20


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message says why (the API answers 400 naming the field)."""


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.max_threads = max_threads
        self._compiler = None
        self._lock = threading.Lock()

    def _xgrammar_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=self.max_threads, cache_limit_bytes=CACHE_LIMIT_BYTES
                )
            return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of ``spec`` (cached by xgrammar on its text); ``GrammarError`` when it
        cannot be compiled."""
        compiler = self._xgrammar_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec.json, any_whitespace=not spec.disable_any_whitespace)
            if kind == "json_object":  # an object, as OpenAI's json_object mode promises (not any JSON value)
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not spec.disable_any_whitespace
                )
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            if kind == "grammar":
                return compiler.compile_grammar(spec.grammar)
            return compiler.compile_structural_tag(spec.structural_tag)
        except Exception as error:  # xgrammar raises RuntimeError, ValueError and its own types
            raise GrammarError(f"cannot compile the {_KIND_NAMES[kind]}: {_reason(error)}") from None


_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON grammar",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "structural_tag": "structural tag",
}


# xgrammar's messages start with a time and its C++ source location: "[21:00:03] /project/cpp/x.cc:94: ".
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return _SOURCE_PREFIX.sub("", lines[0]) if lines else type(error).__name__


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices`` (JSON string literals are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)

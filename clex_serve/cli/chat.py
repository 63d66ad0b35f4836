"""``clex-chat``: a FastChat-style terminal chat, with the engine in process or against a server.

    clex-chat                                        # the embedded demo model
    clex-chat --model DAMO-NLP-SG/CLEX-7B-Chat-16K   # (also --model-path, FastChat's spelling)
    clex-chat --url http://127.0.0.1:8000/v1 [--api-key KEY]

Commands: !!exit, !!reset, !!remove, !!regen, !!save FILE, !!load FILE, !!help. Ctrl-C stops the answer
being written (its work is freed) and keeps what was shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from clex_serve.chat import ChatSourceError, EngineSource, OpenAISource, SyncChatSource
from clex_serve.cli.chat_io import COMMANDS, ChatIO, RichChatIO, SimpleChatIO
from clex_serve.cli.engine_args import add_engine_args, positive_int
from clex_serve.cli.engine_start import start_engine
from clex_serve.cli.help_format import DefaultsOnceHelpFormatter
from clex_serve.sampling_params import SamplingParams

DEFAULT_HISTORY = (
    Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "clex-serve" / "chat_history"
)


def build_parser(prog: str = "clex-chat") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with a CLEX model in the terminal.", formatter_class=DefaultsOnceHelpFormatter
    )
    add_engine_args(parser)
    parser.add_argument("--model-path", dest="model_path", help="the same as --model (FastChat's name)")
    client = parser.add_argument_group("client mode")
    client.add_argument("--url", help="an OpenAI-compatible server to talk to instead of loading a model")
    client.add_argument("--api-key", help="the server's API key (default: $CLEX_SERVE_API_KEY)")
    chat = parser.add_argument_group("chat")
    chat.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    chat.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="1: none")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens per answer at most")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument(
        "--chat-template",
        "--conv-template",
        dest="chat_template",
        help="vicuna, zephyr or a Jinja file (default: the model's own, else its family's)",
    )
    chat.add_argument(
        "--style",
        choices=["rich", "simple"],
        default=None,
        help="rich: markdown and history (default on a terminal); simple: plain lines (pipes)",
    )
    chat.add_argument("--history-file", type=Path, default=DEFAULT_HISTORY, help="input history across sessions")
    return parser


class ChatSession:
    """The conversation and its commands; the source answers, the ChatIO reads and shows."""

    def __init__(self, source: SyncChatSource, io: ChatIO, params: SamplingParams, system: str | None) -> None:
        self.source = source
        self.io = io
        self.params = params
        self.system = system
        self.messages: list[dict] = self._opening()

    def _opening(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def status(self) -> str:
        used = self.source.count_tokens(self.messages) if self.messages else 0
        limit = self.source.max_model_len
        parts = [f"tokens {used if used is not None else '?'}" + (f" / {limit}" if limit else "")]
        scale = self.source.scale_for((used or 0) + 1) if used is not None else None
        if scale is not None:
            parts.append(f"CLEX t = {scale}")
        parts.append("!!help for commands")
        return "  ".join(parts)

    def run(self) -> int:
        while True:
            try:
                text = self.io.read_message(self.status())
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, as in a shell
            if text is None or not text.strip() or text.strip() == "!!exit":
                return 0
            text = text.strip()
            if text.startswith("!!"):
                self.command(text)
                continue
            self.messages.append({"role": "user", "content": text})
            self.answer()

    def command(self, text: str) -> None:
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name == "!!help":
            self.io.info("\n".join(f"{command:9} {meaning}" for command, meaning in COMMANDS.items()))
        elif name == "!!reset":
            self.messages = self._opening()
            self.io.info("(a new conversation)")
        elif name == "!!remove":
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
                self.io.info("(the last turn is gone)")
            else:
                self.io.info("(nothing to remove)")
        elif name == "!!regen":
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if self.messages and self.messages[-1]["role"] == "user":
                self.answer()
            else:
                self.io.info("(no message to answer again)")
        elif name == "!!save":
            if not argument:
                self.io.info("(usage: !!save FILE)")
                return
            try:
                Path(argument).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n")
                self.io.info(f"(saved {len(self.messages)} messages to {argument})")
            except OSError as error:
                self.io.info(f"(cannot save: {error.strerror or error})")
        elif name == "!!load":
            self.load(argument)
        else:
            self.io.info(f"(unknown command {name}; !!help lists them)")

    def load(self, path: str) -> None:
        if not path:
            self.io.info("(usage: !!load FILE)")
            return
        try:
            messages = json.loads(Path(path).read_text())
            valid = isinstance(messages, list) and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        except (OSError, ValueError) as error:
            self.io.info(f"(cannot load {path}: {getattr(error, 'strerror', None) or error})")
            return
        if not valid:
            self.io.info(f"(cannot load {path}: not a list of {{role, content}} messages)")
            return
        self.messages = messages
        self.io.info(f"(loaded {len(messages)} messages from {path})")

    def _fit_context(self) -> bool:
        """Before a turn would overflow the context: say so, offer to drop the oldest turns. A turn needs room
        for its answer too: up to --max-new-tokens of it, at most a quarter of the context."""
        limit = self.source.max_model_len
        if not limit:
            return True
        reserve = min(self.params.max_tokens or 0, limit // 4)
        while True:
            used = self.source.count_tokens(self.messages)
            if used is None or used + 1 <= limit - reserve:
                return True
            first_turn = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first_turn <= 1:
                self.io.info(
                    f"(this message takes {used} tokens; with the {reserve} kept for the answer, the "
                    f"{limit} tokens the model reads are not enough: shorten it)"
                )
                self.messages.pop()
                return False
            if not self.io.confirm(
                f"The conversation ({used} tokens) and the {reserve} tokens kept for the "
                f"answer do not fit the context of {limit}. Drop the oldest turn?"
            ):
                self.messages.pop()
                return False
            del self.messages[first_turn : first_turn + 2]

    def answer(self) -> None:
        if not self._fit_context():
            return
        used = self.source.count_tokens(self.messages) or 0
        limit = self.source.max_model_len
        budget = self.params.max_tokens if not limit else min(self.params.max_tokens, max(1, limit - used))
        params = _with(self.params, max_tokens=budget)
        deltas = self.source.stream(self.messages, params)
        try:
            shown = self.io.show_answer(deltas)
        except KeyboardInterrupt:
            shown = self.io.last_shown
            deltas.close()
            self.io.info("(stopped; the engine is idle)" if self._wait_idle() else "(stopped)")
        except ChatSourceError as error:
            self.io.info(f"error: {error}")
            self.messages.pop()
            return
        finally:
            deltas.close()  # frees the answer's work in the engine or on the server
        self.messages.append({"role": "assistant", "content": shown})

    def _wait_idle(self, timeout: float = 10.0) -> bool:
        """True once the stopped answer's work is gone from the engine (in process; a server cannot say)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = self.source.is_idle()
            if idle is None:
                return False
            if idle:
                return True
            time.sleep(0.02)
        return False


def _with(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def main(argv: list[str] | None = None, prog: str = "clex-chat") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_new_tokens,
            seed=args.seed if args.seed else None,
        )
    except ValueError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    style = args.style or ("rich" if sys.stdin.isatty() and sys.stdout.isatty() else "simple")
    try:
        source = SyncChatSource(_source(args, prog))
    except (ValueError, ChatSourceError) as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    io = RichChatIO(args.history_file) if style == "rich" else SimpleChatIO()
    try:
        return ChatSession(source, io, params, args.system).run()
    finally:
        source.close()


def _source(args, prog: str):
    if args.url:
        return OpenAISource(args.url, args.api_key or os.environ.get("CLEX_SERVE_API_KEY"), args.model)
    from clex_serve.engine.async_engine import AsyncLLMEngine
    from clex_serve.text.chat_template import fallback_template, resolve_chat_template

    args.model = args.model or args.model_path
    engine = start_engine(args, prog)
    template = resolve_chat_template(engine.tokenizer, args.model or "", args.chat_template)
    return EngineSource(
        AsyncLLMEngine(engine), template or fallback_template(engine.model_config.family), args.model, owns_engine=True
    )


if __name__ == "__main__":
    sys.exit(main())

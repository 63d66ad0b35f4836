"""How the terminal chat reads the user and shows the answer (FastChat's ``ChatIO``): a rich one for
terminals, a simple one for pipes and plain terminals. The chat loop only talks to this interface."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from clex_serve.cli.answer_markdown import display_markdown

COMMANDS = {
    "!!exit": "leave (an empty line or Ctrl-D does too)",
    "!!reset": "start a new conversation",
    "!!remove": "drop the last turn (your message and the answer)",
    "!!regen": "answer your last message again",
    "!!save": "!!save FILE: write the conversation as JSON (OpenAI messages)",
    "!!load": "!!load FILE: read a conversation written by !!save",
    "!!help": "this list",
}


class ChatIO:
    last_shown = ""  # what the answer being shown has shown so far (kept when Ctrl-C stops it)

    def read_message(self, status: str) -> str | None:
        """The user's next message; None at end of input (Ctrl-D, a closed pipe)."""
        raise NotImplementedError

    def confirm(self, question: str) -> bool:
        raise NotImplementedError

    def show_answer(self, deltas: Iterable[str]) -> str:
        """Show an answer as it streams; returns what was shown (also when interrupted)."""
        raise NotImplementedError

    def info(self, text: str) -> None:
        raise NotImplementedError


class SimpleChatIO(ChatIO):
    """Plain lines: for pipes (``echo hi | clex-chat``) and terminals without colours."""

    def __init__(self, prompt: str = "USER: ", answer_prefix: str = "ASSISTANT: ") -> None:
        self.prompt = prompt
        self.answer_prefix = answer_prefix
        self.interactive = sys.stdin.isatty()

    def read_message(self, status: str) -> str | None:
        try:
            return input(self.prompt if self.interactive else "")
        except EOFError:
            return None

    def confirm(self, question: str) -> bool:
        if not self.interactive:
            print(f"{question} [Y/n] y")
            return True
        try:
            return input(f"{question} [Y/n] ").strip().lower() in ("", "y", "yes")
        except EOFError:
            return False

    def show_answer(self, deltas: Iterable[str]) -> str:
        shown = self.last_shown = ""
        sys.stdout.write(self.answer_prefix)
        sys.stdout.flush()
        try:
            for delta in deltas:
                sys.stdout.write(delta)
                sys.stdout.flush()
                shown = self.last_shown = shown + delta
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return shown

    def info(self, text: str) -> None:
        print(text, flush=True)


class RichChatIO(ChatIO):
    """prompt-toolkit input (history across sessions, suggestions from it, Esc then Enter for a new line,
    tab completion of commands, a status toolbar) and the answer rendered as markdown while it streams."""

    def __init__(self, history_file: Path) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings
        from rich.console import Console

        history_file.parent.mkdir(parents=True, exist_ok=True)
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _(event):  # Esc then Enter: a new line inside the message, as in FastChat
            event.current_buffer.insert_text("\n")

        @bindings.add("enter")
        def _(event):
            event.current_buffer.validate_and_handle()

        self.session = PromptSession(
            history=FileHistory(str(history_file)),
            auto_suggest=AutoSuggestFromHistory(),
            completer=WordCompleter(list(COMMANDS), sentence=True),
            key_bindings=bindings,
            multiline=True,
        )
        self.console = Console()

    def read_message(self, status: str) -> str | None:
        from prompt_toolkit.formatted_text import HTML

        try:
            return self.session.prompt(HTML("<b>USER</b>: "), bottom_toolbar=status or None)
        except EOFError:
            return None

    def confirm(self, question: str) -> bool:
        try:
            return self.session.prompt(f"{question} [Y/n] ", multiline=False).strip().lower() in ("", "y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False

    def show_answer(self, deltas: Iterable[str]) -> str:
        from rich.live import Live
        from rich.markdown import Markdown

        shown = self.last_shown = ""
        self.console.print("[bold]ASSISTANT[/bold]:")
        with (
            _keys_not_echoed(),
            Live(Markdown(""), console=self.console, refresh_per_second=12, vertical_overflow="visible") as live,
        ):
            for delta in deltas:
                shown = self.last_shown = shown + delta
                live.update(Markdown(display_markdown(shown)))
        return shown

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


@contextlib.contextmanager
def _keys_not_echoed() -> Iterator[None]:
    """While an answer is drawn, the terminal does not echo keys. rich redraws the answer by moving the cursor
    up as many lines as it drew; an echoed ``^C`` (or any key typed meanwhile) moves the cursor on behind its
    back, and the redraw then leaves its first line on the screen twice."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        yield
        return
    try:
        descriptor = sys.stdin.fileno()
        saved = termios.tcgetattr(descriptor)
    except (termios.error, OSError, ValueError, AttributeError):  # standard input is not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))  # [3]: the local modes
    termios.tcsetattr(descriptor, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(descriptor, termios.TCSANOW, saved)

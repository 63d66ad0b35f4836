"""``clex-serve web --url http://HOST:PORT/v1``: the web demo on its own, against an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from clex_serve.cli.help_format import DefaultsOnceHelpFormatter
from clex_serve.web import INSTALL_HINT


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The Gradio chat demo, against an OpenAI-compatible server.",
        formatter_class=DefaultsOnceHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="the server's API key (default: $CLEX_SERVE_API_KEY)")
    parser.add_argument("--model", help="the served model to use (default: the server's first)")
    parser.add_argument("--host", default="127.0.0.1", help="address the demo listens on")
    parser.add_argument("--port", type=int, default=7860, help="port the demo listens on")
    return parser


def main(argv: list[str] | None = None, prog: str = "clex-serve web") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        importlib.import_module("gradio")  # only to say what to install when it is missing
    except ImportError:
        parser.exit(2, f"{prog}: error: {INSTALL_HINT}\n")
    from clex_serve.chat import ChatSourceError, OpenAISource
    from clex_serve.web.app import build_demo

    try:
        source = OpenAISource(args.url, args.api_key or os.environ.get("CLEX_SERVE_API_KEY"), args.model)
    except ChatSourceError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    demo = build_demo(source, f"clex-serve · {source.model_name}")
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        ssr_mode=False,
        quiet=True,
        prevent_thread_lock=True,
        show_error=False,
    )
    print(f"clex-serve: web UI at http://{args.host}:{args.port}/ (answers from {args.url})", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="web/app.py"))

"""The ``clex-serve`` command.

    clex-serve --model DAMO-NLP-SG/CLEX-7B-Chat-16K        # the OpenAI-compatible server (= clex-serve serve)
    clex-serve generate --model DAMO-NLP-SG/CLEX-7B-16K --prompt "Once upon a time" --temperature 0.8
    clex-serve generate --prompt "def read_file(path):"  # the embedded model knows Python's standard library

``serve`` (the default) serves the OpenAI API; ``generate`` streams a completion for ``--prompt`` (or for
each line of standard input) to standard output.
"""

from __future__ import annotations

import argparse
import os
import sys

from clex_serve.api.tool_parsers import DEFAULT_TOOL_CALL_PARSER, TOOL_CALL_PARSERS
from clex_serve.cli.engine_args import add_engine_args, positive_int
from clex_serve.cli.engine_start import start_engine
from clex_serve.cli.help_format import DefaultsOnceHelpFormatter
from clex_serve.sampling_params import RequestOutputKind, SamplingParams

COMMANDS = ("serve", "generate", "chat", "web")
DEMO_MODEL_NAME = "clex-serve-demo"


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex-serve", description="Serve CLEX long-context language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = DefaultsOnceHelpFormatter
    serve = commands.add_parser(
        "serve",
        formatter_class=formatter,
        help="the OpenAI-compatible server (the default command)",
        description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health, "
        "/metrics). `clex-serve generate --help` shows the command-line generator.",
    )
    add_engine_args(serve)
    server = serve.add_argument_group("server")
    server.add_argument(
        "--host",
        default=os.environ.get("CLEX_SERVE_HOST", "127.0.0.1"),
        help="address to listen on (0.0.0.0: every interface; $CLEX_SERVE_HOST sets it too)",
    )
    server.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    server.add_argument(
        "--served-model-name",
        help=f"the model name clients use (default: --model, or {DEMO_MODEL_NAME} for the embedded model)",
    )
    server.add_argument(
        "--chat-template",
        help="vicuna, zephyr, or a Jinja file (default: the tokenizer's own, or the released CLEX chat models' format)",
    )
    server.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CLEX_SERVE_API_KEY, else none)"
    )
    server.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated CORS origins ('*' for any; default: none, so browsers allow same-origin pages only)",
    )
    server.add_argument(
        "--uvicorn-log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="how much uvicorn itself logs (its start-up and connection errors); clex-serve's "
        "own line per request is logged whatever this says",
    )
    server.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds requests in flight may run on after SIGTERM"
    )
    server.add_argument(
        "--max-request-body-bytes",
        type=positive_int,
        default=None,
        help="larger request bodies are refused with a 413 before they are read (default: "
        "sized from the longest prompt the model can read, 64 bytes per token of context, "
        "at least 1 MiB)",
    )
    server.add_argument(
        "--tool-call-parser",
        default=DEFAULT_TOOL_CALL_PARSER,
        choices=sorted(TOOL_CALL_PARSERS),
        help="how the model writes tool calls, for templates without a format of their own (hermes: "
        "<tool_call> JSON lines)",
    )
    server.add_argument(
        "--ui", action="store_true", help="also serve the Gradio chat demo at /ui (pip install 'clex-serve[web]')"
    )
    server.add_argument(
        "--ray-replicas",
        type=positive_int,
        default=None,
        metavar="N",
        help="serve N engine replicas on a local Ray Serve cluster behind its HTTP proxy, routed on the CLEX "
        "scale of each prompt (pip install 'clex-serve[ray]'; default: one engine, no Ray)",
    )
    commands.add_parser("chat", help="the terminal chat (the same as clex-chat; `clex-serve chat --help`)")
    commands.add_parser("web", help="the web demo against a server (`clex-serve web --help`)")
    generate = commands.add_parser(
        "generate", formatter_class=formatter, help="stream completions of prompts to standard output"
    )
    add_engine_args(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", help="the prompt (default: each line of standard input)")
    sampling.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate at most")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    sampling.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument(
        "--ignore-eos", action="store_true", help="write on past the end-of-sequence token, up to --max-tokens"
    )
    return parser


def _stream(engine, prompt: str, params: SamplingParams) -> None:
    request_id = engine.add_request(prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                sys.stdout.write(output.outputs[0].text)  # a delta: only the new text
                sys.stdout.flush()
    sys.stdout.write("\n")


def _serve(args) -> int:
    from clex_serve.cli.listen_sockets import bind_listening_sockets

    sockets = bind_listening_sockets(args.host, args.port)  # a taken port is found before the model loads
    try:
        return _serve_on(sockets, args)
    finally:
        for sock in sockets:
            sock.close()


def _serve_on(sockets, args) -> int:
    from clex_serve.api.server import serve
    from clex_serve.engine.async_engine import AsyncLLMEngine
    from clex_serve.text.chat_template import resolve_chat_template

    engine = start_engine(args, "clex-serve")
    name = args.served_model_name or args.model or DEMO_MODEL_NAME
    template = resolve_chat_template(engine.tokenizer, args.model or "", args.chat_template)
    origins = [origin.strip() for origin in args.allowed_origins.split(",") if origin.strip()]
    api_key = args.api_key or os.environ.get("CLEX_SERVE_API_KEY") or None
    return serve(
        AsyncLLMEngine(engine),
        name,
        sockets,
        template,
        api_key,
        origins,
        args.uvicorn_log_level,
        args.graceful_timeout,
        ui=args.ui,
        max_request_body_bytes=args.max_request_body_bytes,
        tool_call_parser=args.tool_call_parser,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv = ["serve", *argv]  # `clex-serve --model X` serves; `clex-serve --help` shows the server's flags
    if argv[0] == "chat":
        from clex_serve.cli.chat import main as chat_main

        return chat_main(argv[1:], prog="clex-serve chat")
    if argv[0] == "web":
        from clex_serve.web.main import main as web_main

        return web_main(argv[1:], prog="clex-serve web")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            if args.ray_replicas is not None:
                from clex_serve.deploy.local import serve_on_local_ray

                return serve_on_local_ray(args, argv[1:])
            return _serve(args)
        except ValueError as error:
            parser.exit(2, f"clex-serve: error: {error}\n")
        except KeyboardInterrupt:
            return 130
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        engine = start_engine(args, "clex-serve")
        prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
        for prompt in prompts:
            _stream(engine, prompt, params)
    except ValueError as error:  # bad input: one line naming what to change, no traceback
        parser.exit(2, f"clex-serve: error: {error}\n")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``clex-serve`` command.

    clex-serve generate --model DAMO-NLP-SG/CLEX-7B-16K --prompt "Once upon a time"

``generate`` streams a completion for ``--prompt`` (or for each line of standard input) to standard output.
"""

from __future__ import annotations

import argparse
import sys

from clex_serve.cli.engine_args import add_engine_args, engine_config_from_args, positive_int
from clex_serve.sampling_params import RequestOutputKind, SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex-serve", description="Serve CLEX long-context language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser("generate", help="stream completions of prompts to standard output")
    add_engine_args(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", help="the prompt (default: each line of standard input)")
    sampling.add_argument("--max-tokens", type=positive_int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return parser


def _stream(engine, prompt: str, params: SamplingParams) -> None:
    request_id = engine.add_request(prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                sys.stdout.write(output.outputs[0].text)  # a delta: only the new text
                sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, stop=args.stop, output_kind=RequestOutputKind.DELTA)
        from clex_serve.engine.llm_engine import LLMEngine

        engine = LLMEngine(engine_config_from_args(args))
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

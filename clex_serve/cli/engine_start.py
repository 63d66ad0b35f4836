"""The engine every command starts from its flags, with a word about flags that work but cost (the engine
itself refuses, at load, a tokenizer that does not fit the model)."""

from __future__ import annotations

import argparse
import sys

from clex_serve.cli.engine_args import engine_config_from_args


def warn_about_slow_flags(args: argparse.Namespace, prog: str) -> None:
    from clex_serve.loading.loader import resolve_device

    if args.dtype == "float16" and resolve_device(args.device).type == "cpu":
        # CPUs have no float16 arithmetic of their own: every matmul converts, which makes float16 the
        # slowest of the three there. It still works, so it is a warning, not a refusal.
        print(
            f"{prog}: warning: --dtype float16 on the CPU is the slowest choice there (no float16 kernels); "
            f"float32 (what auto picks) or bfloat16 runs faster",
            file=sys.stderr,
            flush=True,
        )


def start_engine(args: argparse.Namespace, prog: str):
    """The LLMEngine for ``args``; ``ValueError`` (one line) for what the user must change."""
    from clex_serve.engine.llm_engine import LLMEngine

    warn_about_slow_flags(args, prog)
    return LLMEngine(engine_config_from_args(args))

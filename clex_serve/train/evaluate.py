"""Length extrapolation: held-out perplexity at 1x..16x the training length, CLEX against RoPE scalings.

    python -m clex_serve.train.evaluate --clex CLEX=clex_serve/assets/default_model \\
        --rope runs/demo/plain/base --plot docs/evaluation.png

A ``--clex`` model runs with its own config (CLEX picks ``t`` from the length). A ``--rope`` model (trained
with plain RoPE) runs four ways at each length ``L``: unscaled, linear position interpolation
(factor ``L / L0``), dynamic NTK, and YaRN (factor ``L / L0``, original length ``L0``). The held-out text is
the corpus's held-out split, tokenized with the first model's tokenizer; logits come from the engine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clex_serve.config import read_lenient_json
from clex_serve.train.corpus import split_files
from clex_serve.train.data import tokenize_files
from clex_serve.train.perplexity import Method, perplexity
from clex_serve.train.report import Results, markdown_table, save_plot
from clex_serve.train.tokenizer import EOS, load_tokenizer

ROPE_VARIANTS = (("no scaling", None), ("linear PI", "linear"), ("dynamic NTK", "dynamic"), ("YaRN", "yarn"))


def held_out_tokens(model_path: Path, num_tokens: int) -> torch.Tensor:
    tokenizer = load_tokenizer(model_path)
    _, held_out = split_files()
    stream = tokenize_files(tokenizer, held_out, tokenizer.token_to_id(EOS))
    return stream[:num_tokens].long()


def methods_for(clex: list[tuple[str, Path]], rope: list[tuple[str, Path]]) -> list[Method]:
    methods = [Method(name, path) for name, path in clex]
    for name, path in rope:
        methods += [Method(f"{name}, {variant}", path, scaling) for variant, scaling in ROPE_VARIANTS]
    return methods


def evaluate(methods: list[Method], factors: list[int], num_tokens: int, log=print) -> tuple[Results, int]:
    if not methods:
        raise ValueError("nothing to evaluate: pass at least one --clex or --rope model")
    base_len = int(read_lenient_json(methods[0].model_path / "config.json")["max_position_embeddings"])
    tokens = held_out_tokens(methods[0].model_path, num_tokens)
    results: Results = {}
    for method in methods:
        results[method.name] = {}
        for factor in factors:
            start = time.time()
            ppl = perplexity(method, tokens, factor * base_len, base_len)
            results[method.name][factor * base_len] = ppl
            log(f"{method.name} @ {factor * base_len}: ppl {ppl:.3f} ({time.time() - start:.0f}s)")
    return results, base_len


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not (Path(path) / "config.json").exists():
        raise argparse.ArgumentTypeError(f"{path} has no config.json; pass a model folder (NAME=PATH or PATH)")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clex", type=_named_path, action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--rope", type=_named_path, action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--factors", default="1,2,4,8,16", help="multiples of the training length")
    parser.add_argument("--num-tokens", type=int, default=32768, help="held-out tokens scored at every length")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # sized for one thread; the engine's CPU path does not need more to finish
    factors = [int(f) for f in args.factors.split(",")]
    if any(f < 1 for f in factors):
        parser.error("--factors must be positive integers")
    results, base_len = evaluate(methods_for(args.clex, args.rope), factors, args.num_tokens)
    print(markdown_table(results, base_len))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"base_len": base_len, "num_tokens": args.num_tokens, "perplexity": results}, indent=2) + "\n"
        )
    if args.plot and save_plot(results, base_len, args.plot):
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

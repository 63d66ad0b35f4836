"""Structured outputs: what a token mask costs a batch, and what each grammar engine costs, in one invocation.

    python bench/structured_benchmark.py [--streams 16] [--tokens 128] [--dtype float32] [--skip-backends]

1. Decode throughput of the 58M benchmark model (bench_model.py's shape, CLEX, with a 32,000-entry byte-level
   BPE trained on the Python standard library, so that JSON is writable) on the CPU: ``--streams`` requests
   with a JSON schema against as many without, each writing ``--tokens`` tokens (the schema is an array long
   enough that none ends early, so that both batches stay full), prompts of 300 tokens (CLEX scale 2).
   Prints output tokens/s of each and the ratio (constrained / free).
2. A 200-field schema compiled while 8 free streams decode: its compile time, and the streams' largest gap
   between tokens against their gaps without it (compiling runs off the engine thread).
3. The grammar engines on the tests' 20 JSON schemas (tests/helpers/json_schemas.py), for that tokenizer:
   compile time cold and cached, and the time to fill one row's token mask along a valid output, for
   xgrammar (the engine's backend) and llguidance (``pip install -e '.[bench]'``; skipped when missing).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
import bench_model  # noqa: E402

from clex_serve import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from clex_serve.train import corpus  # noqa: E402
from clex_serve.train.tokenizer import save_hf_tokenizer, train_tokenizer  # noqa: E402
from helpers.json_schemas import SCHEMAS  # noqa: E402

LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}


def build_model(folder: Path) -> Path:
    """The 58M CLEX benchmark model with a BPE tokenizer of its vocabulary size."""
    _, clex = bench_model.build(folder)
    texts = [source.read() for source in corpus.list_source_files()]
    save_hf_tokenizer(train_tokenizer(texts, bench_model.VOCAB), clex, 8192)
    for name in ("vocab.json", "merges.txt"):  # the word-level tokenizer's leftovers, if any
        (clex / name).unlink(missing_ok=True)
    return clex


def throughput(llm: LLM, prompts: list[list[int]], params: SamplingParams, repeats: int) -> float:
    """Output tokens/s of the batch, the best of ``repeats`` runs (a neighbour's load only lowers a run)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params)
        elapsed = time.perf_counter() - started
        tokens = sum(len(completion.token_ids) for output in outputs for completion in output.outputs)
        best = max(best, tokens / elapsed)
    return best


def measure_throughput(model: Path, args) -> None:
    llm = LLM(str(model), dtype=args.dtype, device="cpu", show_progress=False, max_num_seqs=args.streams)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, bench_model.VOCAB, (300,), generator=generator).tolist() for _ in range(args.streams)]
    free = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, ignore_eos=True)
    constrained = SamplingParams(
        max_tokens=args.tokens,
        temperature=0.8,
        seed=1,
        structured_outputs=StructuredOutputsParams(json=LONG_ARRAY),
    )
    throughput(llm, prompts[:2], free, 1)  # warm-up: kernels, the tokenizer's grammar tables
    throughput(llm, prompts[:2], constrained, 1)
    plain = throughput(llm, prompts, free, args.repeats)
    masked = throughput(llm, prompts, constrained, args.repeats)
    print(f"\n{args.streams} streams x {args.tokens} tokens, 58M CLEX model, {args.dtype}, CPU")
    print(f"  without a schema: {plain:8.1f} output tokens/s")
    print(f"  with a JSON schema: {masked:6.1f} output tokens/s")
    print(f"  ratio (with / without): {masked / plain:.3f}")


def heavy_schema(fields: int) -> dict:
    """An object of ``fields`` required objects of eight typed fields each: a schema that takes a while."""
    inner = {
        "type": "object",
        "properties": {f"x{j}": {"type": ["string", "integer", "null"]} for j in range(8)},
        "required": [f"x{j}" for j in range(8)],
    }
    properties = {f"field_{i}": inner for i in range(fields)}
    return {"type": "object", "properties": properties, "required": list(properties)}


def measure_compile_stall(model: Path, args) -> None:
    """The largest gap between two tokens of running streams while another request's slow schema compiles,
    against the gaps without it: compiling happens where requests are checked, off the engine thread."""
    import asyncio

    from clex_serve.engine.async_engine import AsyncLLMEngine
    from clex_serve.engine.engine_config import EngineConfig
    from clex_serve.engine.llm_engine import LLMEngine
    from clex_serve.sampling_params import RequestOutputKind

    engine = AsyncLLMEngine(
        LLMEngine(EngineConfig(model=str(model), dtype=args.dtype, device="cpu", show_progress=False))
    )
    free = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    schema = heavy_schema(200)

    async def stream(index: int, gaps: list[float]) -> None:
        last = None
        async for _ in engine.generate({"prompt_token_ids": [3 + index] * 32}, free):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    async def run(with_schema: bool) -> tuple[list[float], float]:
        gaps: list[float] = []
        streams = [asyncio.ensure_future(stream(i, gaps)) for i in range(8)]
        compile_time = 0.0
        if with_schema:
            await asyncio.sleep(0.3)  # the streams are decoding
            spec = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(json=schema))
            started = time.perf_counter()
            await engine.compile_grammar(spec)
            compile_time = time.perf_counter() - started
        await asyncio.gather(*streams)
        return gaps, compile_time

    async def both():
        await run(False)  # warm-up
        plain, _ = await run(False)
        stalled, compile_time = await run(True)
        return plain, stalled, compile_time

    plain, stalled, compile_time = asyncio.run(both())
    engine.shutdown()
    print(f"\na {len(schema['properties'])}-field schema compiled while 8 streams decoded ({args.dtype})")
    print(f"  compile time: {compile_time * 1e3:.0f} ms")
    for label, gaps in (("without it", plain), ("with it   ", stalled)):
        median, largest = statistics.median(gaps) * 1e3, max(gaps) * 1e3
        print(f"  inter-token gap {label}: median {median:.1f} ms, max {largest:.1f} ms")


def valid_walk(fill, accept, is_done, vocab: int, max_tokens: int, rng: random.Random) -> list[float]:
    """Fill-times of one row's mask along a random valid output (the grammar picks, the walk follows)."""
    times = []
    for _ in range(max_tokens):
        if is_done():
            break
        started = time.perf_counter()
        bits = fill()
        times.append(time.perf_counter() - started)
        words = bits.tolist()
        allowed = [t for t in range(vocab) if (words[t >> 5] >> (t & 31)) & 1]
        if not allowed:
            break
        accept(rng.choice(allowed))
    return times


def measure_backends(model: Path, max_tokens: int = 60) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model))
    vocab = bench_model.VOCAB
    rows = {}

    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[2])
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    setup = time.perf_counter() - started
    cold, cached, fills = [], [], []
    for index, schema in enumerate(SCHEMAS.values()):
        text = json.dumps(schema)
        started = time.perf_counter()
        grammar = compiler.compile_json_schema(text, any_whitespace=False)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.compile_json_schema(text, any_whitespace=False)
        cached.append(time.perf_counter() - started)
        matcher = xgrammar.GrammarMatcher(grammar)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)

        def fill(matcher=matcher, bitmask=bitmask):
            matcher.fill_next_token_bitmask(bitmask, 0)
            return bitmask[0]

        fills += valid_walk(fill, matcher.accept_token, matcher.is_terminated, vocab, max_tokens, random.Random(index))
    rows["xgrammar"] = (setup, cold, cached, fills)

    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llguidance_torch
    except ImportError:
        print("\nllguidance is not installed (pip install -e '.[bench]'): measuring xgrammar alone")
    else:
        started = time.perf_counter()
        lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        setup = time.perf_counter() - started
        cold, cached, fills = [], [], []
        for index, schema in enumerate(SCHEMAS.values()):
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
            # llguidance compiles lazily, as masks are asked for: "cold" is the matcher and its first mask.
            bitmask = llguidance_torch.allocate_token_bitmask(1, vocab)
            started = time.perf_counter()
            matcher = llguidance.LLMatcher(lltokenizer, grammar)
            llguidance_torch.fill_next_token_bitmask(matcher, bitmask, 0)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = llguidance.LLMatcher(lltokenizer, grammar)
            llguidance_torch.fill_next_token_bitmask(again, bitmask, 0)
            cached.append(time.perf_counter() - started)

            def fill(matcher=matcher, bitmask=bitmask):
                llguidance_torch.fill_next_token_bitmask(matcher, bitmask, 0)
                return bitmask[0]

            fills += valid_walk(
                fill, matcher.consume_token, matcher.is_stopped, vocab, max_tokens, random.Random(index)
            )
        rows["llguidance"] = (setup, cold, cached, fills)

    print(f"\ngrammar engines, the tests' {len(SCHEMAS)} JSON schemas, vocabulary {vocab}")
    print(f"  {'':12} {'setup':>9} {'compile p50':>12} {'max':>9} {'cached p50':>11} {'mask p50':>9} {'p99':>9}")
    for name, (setup, cold, cached, fills) in rows.items():
        fills = sorted(fills)
        p99 = fills[min(len(fills) - 1, int(0.99 * len(fills)))]
        print(
            f"  {name:12} {setup * 1e3:7.1f}ms {statistics.median(cold) * 1e3:10.2f}ms {max(cold) * 1e3:7.2f}ms "
            f"{statistics.median(cached) * 1e3:9.3f}ms {statistics.median(fills) * 1e6:7.1f}us {p99 * 1e6:7.1f}us"
        )
    print("  per schema, xgrammar cold / cached (ms):")
    for name, cold_time, cached_time in zip(SCHEMAS, rows["xgrammar"][1], rows["xgrammar"][2]):
        print(f"    {name:18} {cold_time * 1e3:7.2f} / {cached_time * 1e3:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-backends", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(Path(folder))
        measure_throughput(model, args)
        measure_compile_stall(model, args)
        if not args.skip_backends:
            measure_backends(model)


if __name__ == "__main__":
    main()

"""Speculative decoding (prompt lookup) off against on, in one invocation, on the CPU.

    python bench/spec_benchmark.py [--threads N] [--rounds 5] [--new-tokens 256]

(a) A task whose greedy output copies long spans of its prompt, on the embedded demo model (trained on the
    Python standard library's source): the prompt is the source of ``argparse`` cut to the context length,
    ending with a repeat of one of its earlier passages (200 tokens), and the model goes on copying that
    passage. Single stream, after 1,000 and 3,000 tokens of context (3,000 is past the model's 2,048-token
    limit: it runs with ``allow_long_max_model_len``, CLEX at its largest scale). Decode tokens/s ratio,
    and the acceptance rate of the drafts. Target: at least 2.0.
(b) A task with no repetition: the same model sampling (temperature 1, a fixed seed: with speculation on
    it samples the very same tokens) after a prompt of 1,000 distinct random tokens. Target: at least 0.95.
(c) 16 streams on the 58M benchmark model (random weights, CLEX), greedy after random prompts: output
    tokens/s of all of them together. Target: at least 0.95.

Each figure is the median of ``--rounds`` runs alternating off and on (so that drift on a shared machine
hits both alike); each run's outputs are checked equal between the two. Decode tokens/s counts from a
stream's first token to its last (the prompt's prefill excluded).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import build  # noqa: E402

from clex_serve import LLM, SamplingParams  # noqa: E402

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
REPEATED_PASSAGE = 200  # tokens at the end of the copy prompt that repeat an earlier passage


def copy_prompt(tokenizer, context: int) -> list[int]:
    source = tokenizer(inspect.getsource(argparse), add_special_tokens=False)["input_ids"]
    body = source[: context - REPEATED_PASSAGE]
    return body + body[100 : 100 + REPEATED_PASSAGE]


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    """Distinct tokens: no n-gram of the prompt occurs twice."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randperm(vocab - 3, generator=generator)[:length] + 3).tolist()


def decode_rate(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    """(decode tokens/s of one stream, its tokens)."""
    [output] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    metrics = output.metrics
    tokens = output.outputs[0].token_ids
    return (len(tokens) - 1) / (metrics.last_token_time - metrics.first_token_time), tokens


def streams_rate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """(output tokens/s of all streams arriving together, their tokens)."""
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [output.outputs[0].token_ids for output in outputs]
    return sum(map(len, tokens)) / elapsed, tokens


def off_against_on(rounds: int, run_off, run_on) -> tuple[float, float]:
    """Medians of alternating runs; both must give the same tokens."""
    off, on = [], []
    for _ in range(rounds):
        rate_off, tokens_off = run_off()
        rate_on, tokens_on = run_on()
        if tokens_off != tokens_on:
            raise AssertionError("speculation changed the output")
        off.append(rate_off)
        on.append(rate_on)
    return statistics.median(off), statistics.median(on)


def acceptance(llm: LLM, before) -> str:
    stats = llm.engine.stats()
    drafted = stats.spec_drafted_tokens - before.spec_drafted_tokens
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    verifications = stats.spec_verifications - before.spec_verifications
    if not drafted:
        return "no drafts"
    return f"acceptance {accepted / drafted:.2f}, {1 + accepted / verifications:.2f} tokens per verification"


def print_row(name: str, off: float, on: float, target: float, drafts: str) -> None:
    verdict = "ok" if on / off >= target else "MISSED"
    print(f"{name:36} {off:10.1f} {on:10.1f} {on / off:7.2f} {target:7.2f}  {drafts} [{verdict}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"speculative_config {SPEC}, {args.rounds} alternating rounds, median; threads {torch.get_num_threads()}")
    rows = []

    demo = dict(device="cpu", show_progress=False, allow_long_max_model_len=True, max_model_len=4096)
    plain, spec = LLM(**demo), LLM(**demo, speculative_config=SPEC)
    tokenizer = plain.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    for context in (1000, 3000):
        prompt = copy_prompt(tokenizer, context)
        before = spec.engine.stats()
        off, on = off_against_on(
            args.rounds,
            lambda prompt=prompt: decode_rate(plain, prompt, greedy),
            lambda prompt=prompt: decode_rate(spec, prompt, greedy),
        )
        rows.append((f"(a) copy, {context} tokens of context", off, on, 2.0, acceptance(spec, before)))
        print_row(*rows[-1])

    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = random_prompt(1000, plain.engine.model_config.vocab_size, 1)
    before = spec.engine.stats()
    off, on = off_against_on(
        args.rounds, lambda: decode_rate(plain, prompt, sampled), lambda: decode_rate(spec, prompt, sampled)
    )
    rows.append(("(b) no repetition, sampled", off, on, 0.95, acceptance(spec, before)))
    print_row(*rows[-1])
    del plain, spec

    with tempfile.TemporaryDirectory() as folder:
        _, clex = build(Path(folder))
        big = dict(dtype="float32", device="cpu", show_progress=False, kv_cache_memory_gib=1.0, max_model_len=4096)
        plain, spec = LLM(str(clex), **big), LLM(str(clex), **big, speculative_config=SPEC)
        prompts = [random_prompt(256, 32000, 100 + index) for index in range(16)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens // 2, ignore_eos=True)
        streams_rate(plain, prompts[:2], SamplingParams(max_tokens=4))  # warm up
        before = spec.engine.stats()
        off, on = off_against_on(
            args.rounds, lambda: streams_rate(plain, prompts, params), lambda: streams_rate(spec, prompts, params)
        )
        rows.append(("(c) 16 streams, 58M model", off, on, 0.95, acceptance(spec, before)))
        print_row(*rows[-1])
    print("\nall together:")

    print(f"{'measurement':36} {'off tok/s':>10} {'on tok/s':>10} {'ratio':>7} {'target':>7}  drafts")
    for row in rows:
        print_row(*row)


if __name__ == "__main__":
    main()

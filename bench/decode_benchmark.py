"""Decode throughput of clex-serve against its baselines, on the same weights, in one invocation.

    python bench/decode_benchmark.py [--threads N] [--new-tokens 128]

(a) single-stream decode tokens/s: clex-serve vs transformers ``generate`` on the plain model (t = 1);
(b) CLEX decode at lengths where t > 1 vs the same engine with CLEX replaced by plain RoPE;
(c) output tokens/s at 1, 4 and 16 concurrent requests; (d) mean time to first token at each.
(a) and (b) are medians of five alternating runs.
Prints a table of the measurements and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import BASE_WINDOW, build, parameter_count  # noqa: E402

from clex_serve import LLM, SamplingParams  # noqa: E402


def prompt_ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (length,), generator=generator).tolist()


def engine_decode_rate(llm: LLM, prompt_len: int, new_tokens: int) -> float:
    """Tokens/s of one stream's decode steps (the prefill step and its token excluded). Counted in tokens,
    not steps: a step of a greedy run yields several (``engine/core/decode_runs.py``)."""
    engine = llm.engine
    engine.add_request(
        {"prompt_token_ids": prompt_ids(prompt_len, 1)},
        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
    )
    engine.step()  # prefill and first token
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (new_tokens - 1) / (time.perf_counter() - start)


ROUNDS = 5  # each rate is the median of this many runs, alternating with its baseline


def median_rates(first, second) -> tuple[float, float]:
    """Median of ROUNDS alternating runs of two measurements, so that drift hits both alike."""
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(first())
        b.append(second())
    return sorted(a)[ROUNDS // 2], sorted(b)[ROUNDS // 2]


def transformers_decoder(folder: Path, prompt_len: int, new_tokens: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = torch.tensor([prompt_ids(prompt_len, 1)])

    def run(count: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                inputs,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                attention_mask=torch.ones_like(inputs),
                pad_token_id=0,
            )
        return time.perf_counter() - start

    run(4)  # warm up
    # Subtract a one-token generate (prefill and setup) so that both sides count decode steps only.
    return lambda: (new_tokens - 1) / (run(new_tokens) - run(1))


def concurrency_run(llm: LLM, streams: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(output tokens/s, mean time to first token in s) for ``streams`` requests arriving together."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.monotonic()
    for index in range(streams):
        engine.add_request({"prompt_token_ids": prompt_ids(prompt_len, 100 + index)}, params)
    first_tokens, produced = [], 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if len(output.outputs[0].token_ids) == 1:
                first_tokens.append(output.metrics.time_to_first_token)
            if output.finished:
                produced += len(output.outputs[0].token_ids)
    elapsed = time.monotonic() - start
    return produced / elapsed, sum(first_tokens) / len(first_tokens)


def ratio_rows(plain: Path, clex: Path, base_window: int, new_tokens: int, dtype: str = "float32") -> list[tuple]:
    """The rows (a)-(d): (name, clex-serve figure, baseline figure, ratio)."""
    engine_args = dict(
        dtype=dtype, device="cpu", show_progress=False, max_model_len=base_window * 16, kv_cache_memory_gib=1.0
    )
    rows = []
    # The plain model's own limit is the base window; (b) runs it past that, as plain RoPE.
    plain_llm = LLM(str(plain), allow_long_max_model_len=True, **engine_args)
    ours, theirs = median_rates(
        lambda: engine_decode_rate(plain_llm, 32, new_tokens), transformers_decoder(plain, 32, new_tokens)
    )
    rows.append(
        ("(a) single-stream decode, t = 1", f"{ours:.1f} tok/s", f"transformers {theirs:.1f} tok/s", ours / theirs)
    )

    clex_llm = LLM(str(clex), **engine_args)
    # Prompts of 3 base windows: every decode step runs at t = 4
    prompt_len = 3 * base_window + 1
    clex_rate, rope_rate = median_rates(
        lambda: engine_decode_rate(clex_llm, prompt_len, new_tokens),
        lambda: engine_decode_rate(plain_llm, prompt_len, new_tokens),
    )
    rows.append(
        (
            f"(b) decode from {prompt_len} tokens (CLEX t = 4)",
            f"{clex_rate:.1f} tok/s",
            f"plain RoPE {rope_rate:.1f} tok/s",
            clex_rate / rope_rate,
        )
    )

    throughput = {}
    for streams in (1, 4, 16):
        rate, ttft = concurrency_run(clex_llm, streams, 64, new_tokens)
        throughput[streams] = rate
        rows.append(
            (
                f"(c/d) {streams} concurrent streams, CLEX",
                f"{rate:.1f} out tok/s",
                f"TTFT {ttft * 1000:.0f} ms",
                rate / throughput[1],
            )
        )
    return rows


RATIO_LEGEND = "ratios: (a) clex-serve / transformers; (b) CLEX / plain RoPE; (c) throughput / 1-stream throughput"


def print_table(rows: list[tuple]) -> None:
    print("\n| measurement | clex-serve | baseline | ratio |\n| --- | --- | --- | --- |")
    for name, ours_text, base_text, ratio in rows:
        print(f"| {name} | {ours_text} | {base_text} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for both sides (1 is steady on a shared machine)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        plain, clex = build(Path(folder))
        print(
            f"model: Llama, 8 layers, hidden 512, vocab 32000, {parameter_count(plain) / 1e6:.1f}M parameters, "
            f"float32, CPU threads {args.threads}"
        )
        rows = ratio_rows(plain, clex, BASE_WINDOW, args.new_tokens)
    print_table(rows)
    print("\n" + RATIO_LEGEND)


if __name__ == "__main__":
    main()

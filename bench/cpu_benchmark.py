"""CPU speed of clex-serve against the machine's own memory bandwidth, in one invocation.

    python bench/cpu_benchmark.py [--threads 2] [--skip-ratios]

Decode of a small model reads every weight and every cached K/V once per token, so its yardstick is the
read bandwidth; a prompt's is the compute peak of its dtype. Both are measured first, with the same threads,
by kernels of our own (``cpu_yardsticks``: a STREAM-like read, FMA / vdpbf16ps / AMX chains). Then:

1. single-stream decode after prompts of 200, 3,000 and 7,000 tokens, float32 and bfloat16 (bench_model's
   58M CLEX Llama, base window 512, max_factor 16): tokens/s, bytes read per token (weights except the
   input embedding, plus the K/V of the context) and the effective bandwidth as a fraction of the read
   bandwidth at that size and of the 1 GiB one;
2. whole prompts of 3,000 and 7,000 tokens alone, per dtype: time to first token, linear layers against the
   dtype's compute peak, attention, rotary, and the rest; then 4 and 16 streams per dtype: output tokens/s
   with the bytes and FLOPs they imply (``cpu_prompts_batches``);
3. streams that never wait for a prefill: 8 streams decoding, then 4 prompts of 6,000 tokens arrive; the
   streams' inter-token latency p50 / p99 while the prompts are computed, against the same window without
   arrivals, at the default token budget;
4. host time per step with 64 streams on a 2-layer model: the step's wall time minus the model's forward and
   logits (what is left: scheduling, input preparation, sampling, detokenizing, outputs);
5. output tokens/s at 1, 16 and 64 streams on the 58M model;
6. the decode benchmark's ratios (a)-(d) (``decode_benchmark.py``), unless ``--skip-ratios``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cpu_yardsticks  # noqa: E402
from bench_model import build  # noqa: E402
from cpu_prompts_batches import batch_table, prefill_table  # noqa: E402
from cpu_yardsticks import Yardsticks, read_bandwidth  # noqa: E402
from decode_benchmark import (  # noqa: E402
    RATIO_LEGEND,
    ROUNDS,
    concurrency_run,
    engine_decode_rate,
    print_table,
    prompt_ids,
    ratio_rows,
)

from clex_serve import LLM, SamplingParams  # noqa: E402
from clex_serve.kernels.cpu_linear import CpuLinear  # noqa: E402

BASE_WINDOW = 512
CONTEXTS = (200, 3000, 7000)
DTYPES = ("float32", "bfloat16")


def weight_bytes(llm: LLM) -> int:
    """Bytes a single-stream decode step reads from the weights: all but the input embedding (one row of it
    is read); a linear layer prepared for the CPU counts the layout one row reads (blocked, else oneDNN's)."""
    total = 0
    for name, module in llm.engine.worker.runner.model.named_modules():
        prepared = None
        if isinstance(module, CpuLinear):
            prepared = module.blocked_weight if module.blocked_weight is not None else module.packed_weight
        if prepared is not None:
            total += prepared.numel() * prepared.element_size()
        for param_name, param in module.named_parameters(recurse=False):
            if "embed_tokens" not in name and not (prepared is not None and param_name == "weight"):
                total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(llm: LLM) -> int:
    config = llm.engine.model_config
    element = torch.empty(0, dtype=llm.engine.worker.runner.dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def single_stream_table(clex: Path, yardsticks: Yardsticks, new_tokens: int) -> None:
    """Both dtypes are loaded at once and, at each context, measured in alternating runs (median of
    ``ROUNDS`` each), so that a shared machine's slow spells hit float32 and bfloat16 alike. Each row's
    yardstick is the read bandwidth of a buffer of its own bytes per token (weights + KV), read after each
    of the row's runs, in the same moments, and the highest of those reads: what a decode re-reads every
    token, from the last-level cache as far as it fits, and never below the 1 GiB figure, which is printed
    beside it. (Measured only once after the row, a read in a fast spell of the machine's memory put rows at
    0.62 of it and one in a slow spell at 1.17: its bandwidth moves between about 25 and 55 GB/s within
    seconds.) That highest read set beside the median run understates the fraction on a noisy machine, so
    each run is also paired with the reads just before and after it (the higher of the two, no floor), and
    the median of those runs' fractions is printed too."""
    yardsticks.remeasure()
    rates: dict[tuple[str, int], float] = {}
    rows: list[tuple[int, str, float, int, int, float, float]] = []
    engines = {
        dtype: LLM(
            str(clex),
            dtype=dtype,
            device="cpu",
            show_progress=False,
            max_model_len=BASE_WINDOW * 16,
            kv_cache_memory_gib=1.0,
        )
        for dtype in DTYPES
    }
    for llm in engines.values():
        engine_decode_rate(llm, 32, 8)  # warm up
    for context in CONTEXTS:
        sizes = {
            dtype: (weight_bytes(llm), kv_bytes_per_token(llm) * (context + new_tokens // 2))
            for dtype, llm in engines.items()
        }
        runs: dict[str, list[float]] = {dtype: [] for dtype in engines}
        reads: dict[str, list[float]] = {dtype: [] for dtype in engines}
        paired: dict[str, list[float]] = {dtype: [] for dtype in engines}
        for _ in range(ROUNDS):
            for dtype, llm in engines.items():
                before = read_bandwidth(sum(sizes[dtype]), runs=3)
                runs[dtype].append(engine_decode_rate(llm, context, new_tokens))
                after = read_bandwidth(sum(sizes[dtype]), runs=3)
                reads[dtype].append(max(after, yardsticks.memory))
                paired[dtype].append(runs[dtype][-1] * sum(sizes[dtype]) / max(before, after))
        for dtype in engines:
            rates[dtype, context] = rate = statistics.median(runs[dtype])
            rows.append((context, dtype, rate, *sizes[dtype], max(reads[dtype]), statistics.median(paired[dtype])))
    del engines
    rows.sort(key=lambda row: DTYPES.index(row[1]))
    print(
        "\n| context | dtype | tok/s | MB read per token (weights + KV) | effective GB/s | read bandwidth at that "
        "size GB/s | fraction of it | fraction of 1 GiB's | fraction of the reads beside each run |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for context, dtype, rate, weights, kv, bandwidth, beside in rows:
        effective = (weights + kv) * rate
        print(
            f"| {context} | {dtype} | {rate:.1f} | {weights / 1e6:.0f} + {kv / 1e6:.0f} | "
            f"{effective / 1e9:.1f} | {bandwidth / 1e9:.1f} | {effective / bandwidth:.2f} | "
            f"{effective / yardsticks.memory:.2f} | {beside:.2f} |"
        )
    print(
        "\nbfloat16 / float32 tokens/s: "
        + ", ".join(f"{context}: {rates['bfloat16', context] / rates['float32', context]:.2f}" for context in CONTEXTS)
    )


def stream_latencies(llm: LLM, arrivals: int, arrival_len: int, streams: int = 8) -> list[float]:
    """Inter-token latencies of ``streams`` decoding streams over the window in which ``arrivals`` prompts of
    ``arrival_len`` tokens are computed (without arrivals: over as many steps as that window took, given as
    ``arrivals = 0, arrival_len = steps``)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=100_000 // streams, ignore_eos=True)
    for index in range(streams):
        engine.add_request({"prompt_token_ids": prompt_ids(64, 200 + index)}, params, request_id=f"stream-{index}")
    while sum(1 for seq in engine.scheduler.running if seq.num_output_tokens > 0) < streams:
        engine.step()
    for _ in range(4):
        engine.step()  # settled: every stream decoding
    for index in range(arrivals):
        engine.add_request(
            {"prompt_token_ids": prompt_ids(arrival_len, 300 + index)},
            SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
            request_id=f"arrival-{index}",
        )
    last_token_time: dict[str, float] = {}
    gaps: list[float] = []
    steps = 0
    while True:
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for output in outputs:
            if output.request_id.startswith("stream-"):
                if output.request_id in last_token_time:
                    gaps.append(now - last_token_time[output.request_id])
                last_token_time[output.request_id] = now
        if arrivals and not any(request_id.startswith("arrival-") for request_id in engine.requests):
            break
        if not arrivals and steps >= arrival_len:
            break
    for index in range(streams):
        engine.abort_request(f"stream-{index}")
    stream_latencies.last_steps = steps
    return gaps


def arrivals_table(clex: Path, token_budget: int | None) -> None:
    llm = LLM(
        str(clex),
        dtype="float32",
        device="cpu",
        show_progress=False,
        max_model_len=BASE_WINDOW * 16,
        kv_cache_memory_gib=2.0,
        max_prefill_tokens_with_decodes=token_budget,
        # Every token its own step, in both windows: what is compared is what a prompt adds to a step.
        # (A decode run, where nothing but decodes is planned, would deliver the quiet window's tokens in
        # groups, and its inter-token latency would be that of a group.)
        decode_run_steps=1,
    )
    budget = llm.engine.scheduler.config.max_prefill_tokens_with_decodes
    start = time.perf_counter()
    disturbed = stream_latencies(llm, 4, 6000)
    window = time.perf_counter() - start
    steps = stream_latencies.last_steps
    quiet = stream_latencies(llm, 0, max(steps, 100))

    def percentile(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000

    quiet_p50 = percentile(quiet, 0.5)
    print(
        f"\n8 streams decoding, float32, {budget} prompt tokens per step beside decodes; 4 prompts of 6,000 "
        f"tokens arrive ({steps} steps, {window:.0f} s until all are computed)"
    )
    print("| window | ITL p50 ms | ITL p99 ms | p99 / undisturbed p50 |\n| --- | --- | --- | --- |")
    print(
        f"| no arrivals | {quiet_p50:.1f} | {percentile(quiet, 0.99):.1f} | {percentile(quiet, 0.99) / quiet_p50:.2f} |"
    )
    print(
        f"| 4 arrivals of 6,000 tokens | {percentile(disturbed, 0.5):.1f} | {percentile(disturbed, 0.99):.1f} | "
        f"{percentile(disturbed, 0.99) / quiet_p50:.2f} |"
    )


def host_time_per_step(folder: Path, streams: int = 64, new_tokens: int = 256) -> None:
    """Step wall time minus the model's forward and logits (or the whole-step decode call), with ``streams``
    greedy streams on a 2-layer model; early steps (short contexts) against late ones, which shows whether host
    work grows with the tokens. Every step alone (no decode runs, which spread the host work over a run's
    steps): what the host adds to a step."""
    _, tiny = build(folder / "two_layers", num_layers=2, base_window=BASE_WINDOW)
    llm = LLM(
        str(tiny),
        dtype="float32",
        device="cpu",
        show_progress=False,
        max_model_len=BASE_WINDOW * 16,
        kv_cache_memory_gib=1.0,
        decode_run_steps=1,
    )
    engine = llm.engine
    runner = engine.worker.runner
    model = runner.model
    forward_time = [0.0]
    originals = {name: getattr(model, name) for name in ("forward", "compute_logits")}
    # Decode steps that the whole-step C++ call takes (CpuDecodeStep) run neither: its call is their forward.
    fast_path = runner.cpu_decode

    def timed(function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            forward_time[0] += time.perf_counter() - start
            return result

        return run

    for name, function in originals.items():
        setattr(model, name, timed(function))
    if fast_path is not None:
        fast_path.logits = timed(fast_path.logits)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for index in range(streams):
        engine.add_request({"prompt_token_ids": prompt_ids(64, 500 + index)}, params)
    while any(seq.num_output_tokens == 0 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    host, total = [], []
    while engine.has_unfinished_requests():
        forward_time[0] = 0.0
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        total.append(elapsed)
        host.append(elapsed - forward_time[0])
    for name in originals:
        delattr(model, name)  # back to the class's methods
    if fast_path is not None:
        del fast_path.logits
    early, late = slice(0, 32), slice(-33, -1)
    print(f"\nhost time per step, {streams} streams, 2-layer model, float32 (ms; median over 32 steps)")
    print("| steps | step | forward + logits | host (the rest) |\n| --- | --- | --- | --- |")
    for name, part in (("first 32 decode steps", early), ("last 32 decode steps", late)):
        step_ms = statistics.median(total[part]) * 1000
        host_ms = statistics.median(host[part]) * 1000
        print(f"| {name} | {step_ms:.2f} | {step_ms - host_ms:.2f} | {host_ms:.2f} |")


def throughput_table(clex: Path, new_tokens: int) -> None:
    llm = LLM(
        str(clex),
        dtype="float32",
        device="cpu",
        show_progress=False,
        max_model_len=BASE_WINDOW * 16,
        kv_cache_memory_gib=1.0,
    )
    concurrency_run(llm, 1, 64, 8)  # warm up
    print("\n| streams | output tok/s | mean TTFT ms |\n| --- | --- | --- |")
    for streams in (1, 16, 64):
        rate, ttft = concurrency_run(llm, streams, 64, new_tokens)
        print(f"| {streams} | {rate:.1f} | {ttft * 1000:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads for everything measured, the bandwidth included",
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="decoded tokens per single-stream run")
    parser.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="max_prefill_tokens_with_decodes for the arrivals part (default: the engine's)",
    )
    parser.add_argument("--skip-ratios", action="store_true", help="leave out the ratios (a)-(d)")
    parser.add_argument(
        "--only",
        choices=("single", "prompts", "batches", "arrivals", "host", "throughput", "ratios"),
        help="run one part (after the bandwidth)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not cpu_yardsticks.available():
        parser.error("the yardsticks are C++ kernels of clex-serve's CPU path, which do not build here")
    yardsticks = cpu_yardsticks.Yardsticks()
    print(f"CPU threads {args.threads}")
    yardsticks.print()
    with tempfile.TemporaryDirectory() as folder:
        plain, clex = build(Path(folder), base_window=BASE_WINDOW)
        parts = {
            "single": lambda: single_stream_table(clex, yardsticks, args.new_tokens),
            "prompts": lambda: prefill_table(clex, yardsticks),
            "batches": lambda: batch_table(clex, yardsticks, weight_bytes, kv_bytes_per_token),
            "arrivals": lambda: arrivals_table(clex, args.token_budget),
            "host": lambda: host_time_per_step(Path(folder)),
            "throughput": lambda: throughput_table(clex, 128),
            "ratios": lambda: (print_table(ratio_rows(plain, clex, BASE_WINDOW, 128)), print(RATIO_LEGEND)),
        }
        for name, part in parts.items():
            if (args.only is None and not (name == "ratios" and args.skip_ratios)) or args.only == name:
                part()
                sys.stdout.flush()
        print("\nthe yardsticks at the end (the highest of every measurement; the fractions above used these or less)")
        yardsticks.print()


if __name__ == "__main__":
    main()

"""Parts of the CPU benchmark measured against the compute peaks: whole prompts, and batches of streams.

- ``prefill_table``: time to first token of one prompt of 3,000 and 7,000 tokens alone, per dtype, split into
  the linear layers (their FLOPs counted per call, as a fraction of the dtype's peak), attention (causal
  FLOPs) and the rotary with the cache write; what is neither is the rest of the step (norms, activation,
  the CLEX cos/sin, the head, sampling, Python).
- ``batch_table``: output tokens/s of 4 and 16 streams arriving together (64-token prompts, 128 tokens each),
  per dtype, with the bytes per second and FLOP/s the decode steps imply.
"""

from __future__ import annotations

import time
from pathlib import Path

from cpu_yardsticks import Yardsticks
from decode_benchmark import concurrency_run, prompt_ids

from clex_serve import LLM, SamplingParams
from clex_serve.kernels.cpu_linear import CpuLinear

DTYPES = ("float32", "bfloat16")
PROMPTS = (3000, 7000)
BATCHES = (4, 16)


def _engine(clex: Path, dtype: str) -> LLM:
    return LLM(str(clex), dtype=dtype, device="cpu", show_progress=False, max_model_len=8192, kv_cache_memory_gib=1.0)


class StepParts:
    """Wall time (and linear FLOPs) spent in the linear layers, attention and rotary of one runner, by
    wrapping them on the instances while measuring; ``restore`` puts the class's methods back."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.engine.worker.runner
        self.seconds = {"linear": 0.0, "attention": 0.0, "rotary": 0.0}
        self.linear_flops = 0
        self.wrapped: list[tuple[object, str]] = []
        for module in runner.model.modules():
            if isinstance(module, CpuLinear):
                self._wrap(module, "forward", "linear", module)
        self._wrap(runner.backend, "_attend", "attention")
        self._wrap(runner.backend, "rotate_and_write", "rotary")

    def _wrap(self, owner: object, name: str, part: str, linear: CpuLinear | None = None) -> None:
        function = getattr(owner, name)
        had_own = name in vars(owner)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - start
            if linear is not None:
                self.linear_flops += 2 * args[0].numel() * linear.out_features
            return result

        setattr(owner, name, timed)
        self.wrapped.append((owner, name, function if had_own else None))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.linear_flops = 0

    def restore(self) -> None:
        for owner, name, original in self.wrapped:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def time_to_first_token(llm: LLM, length: int, seed: int) -> float:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.add_request({"prompt_token_ids": prompt_ids(length, seed)}, params)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def prefill_table(clex: Path, yardsticks: Yardsticks, runs: int = 3) -> None:
    """Fastest of ``runs`` per row (each prompt new: no cached prefix)."""
    yardsticks.remeasure()
    print(
        "\nwhole prompts alone (fastest of 3): time to first token, linear layers against the dtype's peak "
        "(bfloat16: AMX where present, else vdpbf16ps), attention, rotary + cache write, the rest"
    )
    print(
        "| dtype | prompt | TTFT s | linear s | linear GFLOP/s | fraction of peak | attention s | attention "
        "GFLOP/s | rotary s | neither, fraction of the step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in DTYPES:
        llm = _engine(clex, dtype)
        config = llm.engine.model_config
        time_to_first_token(llm, 256, 0)  # warm up
        parts = StepParts(llm)
        for length in PROMPTS:
            best = None
            for run in range(runs):
                parts.reset()
                ttft = time_to_first_token(llm, length, 10 + run)
                if best is None or ttft < best[0]:
                    best = (ttft, dict(parts.seconds), parts.linear_flops)
            ttft, seconds, linear_flops = best
            # Causal: L (L + 1) / 2 query-key pairs, each 2 D FLOPs for the scores and 2 D for the values.
            attention_flops = config.num_hidden_layers * config.num_attention_heads * config.head_dim * 2
            attention_flops *= length * (length + 1)
            neither = ttft - sum(seconds.values())
            print(
                f"| {dtype} | {length} | {ttft:.2f} | {seconds['linear']:.2f} | "
                f"{linear_flops / seconds['linear'] / 1e9:.0f} | "
                f"{linear_flops / seconds['linear'] / yardsticks.peak(dtype):.2f} | {seconds['attention']:.2f} | "
                f"{attention_flops / seconds['attention'] / 1e9:.0f} | {seconds['rotary']:.2f} | "
                f"{neither:.2f}, {neither / ttft:.2f} |"
            )
        parts.restore()
        del llm


def batch_table(clex: Path, yardsticks: Yardsticks, weight_bytes, kv_bytes_per_token, new_tokens: int = 128) -> None:
    """Each row's rate is the best of two runs. Bytes per decode step: the weights once plus every stream's
    K/V at its mean context; FLOPs per output token: two per weight of the linear layers and the head."""
    yardsticks.remeasure()
    print(
        f"\nstreams arriving together (64-token prompts, {new_tokens} new tokens each; best of 2): output tokens/s, "
        "and what the decode steps imply"
    )
    print("| dtype | streams | output tok/s | decode steps/s | GB/s implied | fraction of 1 GiB's | GFLOP/s implied |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in DTYPES:
        llm = _engine(clex, dtype)
        concurrency_run(llm, 2, 64, 8)  # warm up
        weights = weight_bytes(llm)
        element = 2 if dtype == "bfloat16" else 4
        linear_flops = 2 * weights // element
        for streams in BATCHES:
            rate = max(concurrency_run(llm, streams, 64, new_tokens)[0] for _ in range(2))
            steps = rate / streams
            bytes_per_step = weights + streams * kv_bytes_per_token(llm) * (64 + new_tokens // 2)
            print(
                f"| {dtype} | {streams} | {rate:.1f} | {steps:.1f} | {bytes_per_step * steps / 1e9:.1f} | "
                f"{bytes_per_step * steps / yardsticks.memory:.2f} | {linear_flops * rate / 1e9:.0f} |"
            )
        del llm

"""Decode speed of clex-serve on a GPU, against the memory-bandwidth bound and its baselines, in one invocation.

    python bench/gpu_benchmark.py                     # the 7B shape in bfloat16 on CUDA
    python bench/gpu_benchmark.py --tiny --device cpu # the same code on a small model (a smoke run)

The model is a random CLEX-Llama of the 7B shape (32 layers, hidden 4096, intermediate 11008, 32 heads,
vocab 32000, L0 4096, max_factor 16, log_scale as CLEX-7B-16K), weights from ``--load-format dummy``, and
the same weights with plain RoPE. Measured:

1. the ceiling: a device-to-device copy, counting bytes read and written;
2. batch-1 decode tokens/s at each context length, CLEX and plain RoPE (medians of alternating rounds), and
   the fraction of the bandwidth bound reached: (weight bytes + KV bytes read per token) / ceiling;
3. the same CLEX decode with CUDA graphs off (eager);
4. transformers ``generate`` on the same weights (plain RoPE), single stream at the first context length;
5. output tokens/s at 1, 16 and 64 concurrent streams (128-token prompts, 128 new tokens each);
6. the decode attention kernel alone at the longest context, over a sweep of its launch parameters.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import write_tokenizer  # noqa: E402
from decode_benchmark import concurrency_run  # noqa: E402

from clex_serve import LLM, SamplingParams  # noqa: E402
from clex_serve.loading.loader import checkpoint_tensors  # noqa: E402

SHAPE_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
SHAPE_TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=256,
)
MAX_FACTOR = 16
GIB = 1 << 30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a large device-to-device copy, counting each byte read and each byte written."""
    source = torch.randint(0, 255, (megabytes << 20,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for round_index in range(13):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        if round_index >= 3:  # warm-up rounds are not timed
            times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times)


def write_model(folder: Path, shape: dict, clex: bool) -> Path:
    folder.mkdir(parents=True)
    raw = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **shape,
    )
    if clex:
        raw.update(
            log_scale=True,
            rope_scaling={"type": "clex", "max_factor": MAX_FACTOR, "param_factor": 1, "act": "silu", "time_dt": 0.01},
        )
    else:  # the same weights read as a plain RoPE model with a window as long as CLEX's limit
        raw["max_position_embeddings"] = shape["max_position_embeddings"] * MAX_FACTOR
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer(folder, shape["vocab_size"])
    return folder


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def decode_rate(llm: LLM, context: int, new_tokens: int) -> float:
    """Tokens/s of one stream's decode steps from ``context - new_tokens`` to ``context`` tokens."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    engine.add_request(
        {"prompt_token_ids": prompt_ids(context - new_tokens, 1, vocab)},
        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
    )
    engine.step()  # prefill and first token
    synchronize(engine.device)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    synchronize(engine.device)
    return steps / (time.perf_counter() - start)


def graph_replay_ms(llm: LLM, replays: int = 30) -> float | None:
    """GPU time of one batch-1 decode forward alone: the bucket-1 graph replayed on the last step's inputs
    (the engine step around it adds scheduling, sampling and output processing on the host)."""
    graphs = llm.engine.worker.runner.decode_graphs
    if graphs is None:
        return None
    graphs.graphs[1].replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graphs.graphs[1].replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1000


def kernel_profile(llm: LLM, context: int, steps: int = 4) -> str:
    """The GPU kernels of eager batch-1 decode steps at ``context`` tokens, by total time (torch.profiler):
    where a forward's time goes, kernel by kernel (graphs replay the same kernels without launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    runner = engine.worker.runner
    engine.add_request(
        {"prompt_token_ids": prompt_ids(context - steps - 1, 2, engine.model_config.vocab_size)},
        SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True),
    )
    engine.step()
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        runner.decode_graphs = graphs
    averages = profiler.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=18, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return "(no profile)"


def bytes_per_token(llm: LLM, mean_context: float) -> float:
    """What one decode step must read at least: every weight once (the embedding: one row) and the cache."""
    model = llm.engine.worker.runner.model
    config = llm.engine.model_config
    element = torch.empty(0, dtype=llm.engine.worker.runner.dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * element
    if not config.tie_word_embeddings:
        weights -= (config.vocab_size - 1) * config.hidden_size * element
    kv = mean_context * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element
    return weights + kv


def transformers_rate(llm: LLM, shape: dict, context: int, new_tokens: int, rounds: int) -> float:
    """transformers ``generate`` (its default cache and attention) on the plain engine's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device, dtype = llm.engine.device, llm.engine.worker.runner.dtype
    config = LlamaConfig(
        **{**shape, "max_position_embeddings": shape["max_position_embeddings"] * MAX_FACTOR},
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    theirs = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint_tensors(llm.engine.worker.runner.model).items():
            theirs[name].copy_(tensor)
    inputs = torch.tensor([prompt_ids(context - new_tokens, 1, shape["vocab_size"])], device=device)

    def seconds(count: int) -> float:
        synchronize(device)
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
        synchronize(device)
        return time.perf_counter() - start

    seconds(4)  # warm up
    # A one-token generate (prefill and setup) is subtracted so that both sides count decode steps only.
    rates = [(new_tokens - 1) / (seconds(new_tokens) - seconds(1)) for _ in range(rounds)]
    return statistics.median(rates)


def kernel_sweep(context: int, shape: dict, bandwidth: float) -> list[tuple[str, float, float]]:
    """The decode attention kernel alone, one layer, batch 1: (launch parameters, microseconds, fraction of
    the copy bandwidth) for each variant, the KV bytes read counted once."""
    from triton.testing import do_bench

    from clex_serve.attention.triton_decode import paged_decode_attention

    heads, head_dim, block_size = shape["num_key_value_heads"], shape["hidden_size"] // shape["num_attention_heads"], 16
    num_blocks = -(-context // block_size)
    generator = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, device="cuda", generator=generator).bfloat16()
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(1, shape["num_attention_heads"], head_dim, device="cuda", generator=generator).bfloat16()
    table = torch.randperm(num_blocks, device="cuda", generator=generator).int()[None]
    lengths = torch.tensor([context], dtype=torch.int32, device="cuda")
    kv_bytes = 2 * context * heads * head_dim * 2
    variants = [
        dict(num_splits=32, tile=tile, num_warps=warps, num_stages=stages)
        for tile in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3)
    ]
    variants += [dict(num_splits=splits, tile=64, num_warps=4, num_stages=2) for splits in (8, 16, 64)]
    rows = []
    for variant in variants:
        splits = variant.pop("num_splits")
        millis = do_bench(
            lambda splits=splits, variant=variant: paged_decode_attention(
                q, k_cache, v_cache, table, lengths, splits, **variant
            ),
            warmup=25,
            rep=100,
            return_mode="median",
        )
        label = f"splits {splits}, tile {variant['tile']}, warps {variant['num_warps']}, stages {variant['num_stages']}"
        rows.append((label, millis * 1000, kv_bytes / (millis / 1000) / bandwidth))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model instead of the 7B shape")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths (default 1024,16384)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    contexts = [int(c) for c in (args.contexts or ("256,2048" if args.tiny else "1024,16384")).split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
        "shape": shape,
    }

    bandwidth = copy_bandwidth(device, 2048 if device.type == "cuda" else 128)
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    print(f"device {results['device']}, {dtype}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        engine_args = dict(
            load_format="dummy",
            dtype=dtype,
            device=args.device,
            show_progress=False,
            max_model_len=max(contexts) + 256,
            max_num_seqs=max(streams),
            kv_cache_memory_gib=10.0 if device.type == "cuda" else 1.0,
        )
        started = time.perf_counter()
        clex = LLM(str(write_model(Path(folder) / "clex", shape, clex=True)), **engine_args)
        print(
            f"CLEX engine ready in {time.perf_counter() - started:.1f} s (graphs: "
            f"{clex.engine.worker.runner.decode_graphs is not None}, "
            f"attention: {clex.engine.worker.runner.backend.name})",
            flush=True,
        )
        plain = LLM(str(write_model(Path(folder) / "plain", shape, clex=False)), **engine_args)
        parameters = sum(p.numel() for p in clex.engine.worker.runner.model.parameters())
        print(f"model: {parameters / 1e9:.2f}B parameters", flush=True)

        decode = {}
        for context in contexts:
            clex_rates, plain_rates = [], []
            for _ in range(args.rounds):
                clex_rates.append(decode_rate(clex, context, args.new_tokens))
                plain_rates.append(decode_rate(plain, context, args.new_tokens))
            replay = graph_replay_ms(clex)
            mean_context = context - args.new_tokens / 2
            bound = bandwidth / bytes_per_token(clex, mean_context)
            graphs, clex.engine.worker.runner.decode_graphs = clex.engine.worker.runner.decode_graphs, None
            eager = decode_rate(clex, context, args.new_tokens)
            clex.engine.worker.runner.decode_graphs = graphs
            decode[context] = dict(
                clex=statistics.median(clex_rates),
                plain=statistics.median(plain_rates),
                eager=eager,
                bound=bound,
                replay_ms=replay,
                clex_rounds=clex_rates,
                plain_rounds=plain_rates,
            )
            print(f"context {context}: {decode[context]}", flush=True)
        results["decode"] = decode

        if device.type == "cuda":
            try:
                print(
                    f"\neager batch-1 decode kernels at {contexts[0]} tokens:\n{kernel_profile(clex, contexts[0])}",
                    flush=True,
                )
            except Exception as error:  # a diagnostic: the measurements above and below stand without it
                print(f"(kernel profile failed: {error!r})", flush=True)

        hf_rate = transformers_rate(plain, shape, contexts[0], args.new_tokens, args.rounds)
        results["transformers"] = hf_rate
        print(f"transformers generate at {contexts[0]}: {hf_rate:.1f} tok/s", flush=True)
        del plain
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        throughput = {}
        for count in streams:
            throughput[count] = concurrency_run(clex, count, 128, 128)
            print(
                f"{count} streams: {throughput[count][0]:.0f} out tok/s, TTFT {throughput[count][1] * 1000:.0f} ms",
                flush=True,
            )
        results["throughput"] = throughput

    sweep = kernel_sweep(max(contexts), shape, bandwidth) if device.type == "cuda" else []
    results["kernel_sweep"] = sweep

    print("\n| measurement | clex-serve | baseline | ratio |\n| --- | --- | --- | --- |")
    for context, row in decode.items():
        print(
            f"| batch-1 decode at {context} tokens, CLEX, graphs | {row['clex']:.1f} tok/s | bandwidth bound "
            f"{row['bound']:.1f} tok/s | {row['clex'] / row['bound']:.2f} |"
        )
        print(
            f"| batch-1 decode at {context} tokens, CLEX vs plain RoPE | {row['clex']:.1f} tok/s | "
            f"{row['plain']:.1f} tok/s | {row['clex'] / row['plain']:.3f} |"
        )
        print(
            f"| batch-1 decode at {context} tokens, graphs vs eager | {row['clex']:.1f} tok/s | "
            f"{row['eager']:.1f} tok/s | {row['clex'] / row['eager']:.2f} |"
        )
        if row["replay_ms"] is not None:
            print(
                f"| batch-1 forward alone at {context} tokens (graph replay) | {row['replay_ms']:.2f} ms | "
                f"engine step {1000 / row['clex']:.2f} ms | {row['replay_ms'] * row['clex'] / 1000:.2f} |"
            )
    first = decode[contexts[0]]
    print(
        f"| single stream at {contexts[0]}, plain RoPE vs transformers generate | {first['plain']:.1f} tok/s | "
        f"{hf_rate:.1f} tok/s | {first['plain'] / hf_rate:.2f} |"
    )
    for count, (rate, ttft) in throughput.items():
        print(
            f"| {count} concurrent streams, CLEX | {rate:.0f} out tok/s | TTFT {ttft * 1000:.0f} ms | "
            f"{rate / throughput[streams[0]][0]:.2f} |"
        )
    if sweep:
        print(f"\ndecode attention alone, one layer, batch 1, {max(contexts)} tokens:")
        for label, micros, fraction in sweep:
            print(f"  {label}: {micros:.1f} us, {fraction:.2f} of copy bandwidth")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

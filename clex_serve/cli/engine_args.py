"""Engine flags shared by every ``clex-serve`` command, and their translation into ``EngineConfig``."""

from __future__ import annotations

import argparse

from clex_serve.attention.selector import BACKENDS
from clex_serve.engine.core.scheduler import SchedulerConfig
from clex_serve.engine.engine_config import EngineConfig
from clex_serve.engine.spec_decode.config import SpeculativeConfig
from clex_serve.loading.loader import LOAD_FORMATS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def speculative_config(text: str) -> SpeculativeConfig | None:
    try:
        return SpeculativeConfig.from_user(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("speculative_config ")) from None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", help="Hugging Face folder or hub id (default: the embedded demo model)")
    group.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    group.add_argument("--revision", help="hub revision (branch, tag or commit; default: the main branch)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    group.add_argument(
        "--max-model-len",
        type=positive_int,
        help="longest prompt + output (default: max_position_embeddings * max_factor for CLEX)",
    )
    group.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences batched together")
    group.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        help="tokens per step (decodes plus prompt chunks); default max(max-model-len, 2048)",
    )
    group.add_argument(
        "--max-prefill-tokens-with-decodes",
        type=positive_int,
        help="prompt tokens in a step that also decodes running streams, which bounds their "
        "inter-token latency while prompts are computed (prompts of at most "
        f"{SchedulerConfig.SHORT_PROMPT_FACTOR}x this go whole); default 12 on the CPU, "
        "2048 on CUDA",
    )
    group.add_argument(
        "--block-size", type=positive_int, help="KV cache block size in tokens (default: the attention backend's)"
    )
    group.add_argument(
        "--kv-cache-memory",
        type=positive_float,
        metavar="GIB",
        help="KV cache size in GiB (default: what the memory fraction below for the device gives)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=fraction,
        default=0.9,
        help="CUDA: fraction of the GPU's memory for weights, activations and KV cache together; "
        "the KV cache gets what a profiling step leaves",
    )
    group.add_argument(
        "--kv-cache-memory-fraction",
        type=fraction,
        default=0.9,
        help="CPU: fraction of available RAM for the KV cache (at most 4 GiB)",
    )
    group.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode eagerly, without CUDA graphs")
    group.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="dummy: random weights from config.json alone, for benchmarks",
    )
    group.add_argument("--enable-prefix-caching", action="store_true", help="reuse KV blocks of shared prompt prefixes")
    group.add_argument(
        "--attention-backend",
        default="auto",
        choices=BACKENDS,
        help="auto: flash-attn on CUDA when installed, else triton on CUDA, sdpa on the CPU",
    )
    group.add_argument(
        "--log-scale",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="override the checkpoint's CLEX log_scale",
    )
    group.add_argument(
        "--allow-long-max-model-len",
        action="store_true",
        help="accept --max-model-len above the model's limit (CLEX stays at its largest scale)",
    )
    group.add_argument(
        "--max-queued-requests", type=positive_int, help="refuse requests beyond this many waiting (default: no limit)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed of unseeded sampling and dummy weights")
    group.add_argument("--no-progress-bar", action="store_true", help="no progress bar while loading weights")
    group.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: the physical cores)")
    group.add_argument(
        "--speculative-config",
        type=speculative_config,
        help='speculative decoding by prompt lookup, as JSON with vLLM\'s keys: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' (default: off)',
    )
    group.add_argument(
        "--decode-run-steps",
        type=positive_int,
        help="decodes that are greedy or sample at a plain temperature run this many steps in one go when a "
        "step has nothing else; their tokens stream in groups (default: 8 on the CPU's fused decode path, else 1)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes,
        block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        load_format=args.load_format,
        allow_long_max_model_len=args.allow_long_max_model_len,
        max_queued_requests=args.max_queued_requests,
        seed=args.seed,
        show_progress=not args.no_progress_bar,
        threads=args.threads,
        enable_prefix_caching=args.enable_prefix_caching,
        attention_backend=args.attention_backend,
        log_scale=args.log_scale,
        speculative_config=args.speculative_config,
        decode_run_steps=args.decode_run_steps,
    )

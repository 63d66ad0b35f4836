"""Engine settings chosen by the user, validated once, and the KV pool size they imply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clex_serve.config import ModelConfig
from clex_serve.engine.spec_decode.config import SpeculativeConfig
from clex_serve.engine.worker.kv_cache import bytes_per_block

GIB = 1 << 30


def default_prefill_tokens_with_decodes(device_type: str) -> int:
    """On the CPU, with the 58M benchmark model in float32, 8 streams decode in 28-38 ms a step and each prompt
    token beside them adds 1-3 ms (more as the prompt's cached context grows). Measured with 4 prompts of
    6,000 tokens arriving (bench/cpu_benchmark.py), the streams' p99 inter-token latency over their
    undisturbed p50 is 2.38 at 12 prompt tokens a step and 3.00 at 16 (2.56 at 16 before decode steps got
    faster, 3.10 at 24), while computing the prompts beside them takes 114 and about 90 s. Short prompts go
    whole from eight times this (``SchedulerConfig.short_prompt_tokens_with_decodes``); a prompt alone gets
    the whole budget. On CUDA, 2048 is vLLM's chunk size for online serving."""
    return 12 if device_type == "cpu" else 2048


def default_decode_run_steps(fused_cpu_decode: bool) -> int:
    """8 where the CPU's fused decode runs a decode run in one call; elsewhere 1, each step alone (a CUDA
    step's host work overlaps the GPU's). The benchmark model on this CPU, one engine per setting alternating
    in one process, median of five: one stream after 200 tokens, bfloat16 272 tok/s a step at a time, 312
    at 4 steps a run, 315 at 8, 318 at 16; float32 180, 196 at 4, 202 at 8. 16 streams, 4 steps a run:
    bfloat16 1,341-1,385 -> 1,502-1,570 tok/s, float32 817-924 -> 935-981 (8 steps: ``MAX_RUN_TOKENS``)."""
    return 8 if fused_cpu_decode else 1


@dataclass
class EngineConfig:
    model: str | None = None  # a folder or hub id; None: the embedded demo model
    tokenizer: str | None = None  # defaults to the model's folder
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: max_position_embeddings * max_factor under CLEX
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # default: max(max_model_len, 2048)
    # Prompt tokens in a step that also decodes running streams (bounds their inter-token latency while
    # prompts are computed). Default: 12 on the CPU, 2048 on CUDA (``default_prefill_tokens_with_decodes``).
    max_prefill_tokens_with_decodes: int | None = None
    block_size: int | None = None  # default: 16, or 256 with flash-attn
    kv_cache_memory_gib: float | None = None  # the KV pool in GiB; default: sized from the memory left
    # CUDA: the fraction of the GPU's memory the engine may hold in all (weights, activations, KV pool).
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_fraction: float = 0.9  # CPU: of available RAM for the KV pool, at most 4 GiB
    enforce_eager: bool = False  # no CUDA graphs for decode
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks)
    enable_prefix_caching: bool = False
    attention_backend: str = "auto"
    log_scale: bool | None = None  # override the config's log_scale, as the official chat's flag does
    # Accept max_model_len above the model's own limit (L0 * max_factor under CLEX), as vLLM's
    # VLLM_ALLOW_LONG_MAX_MODEL_LEN does; CLEX then stays at its largest scale past the limit.
    allow_long_max_model_len: bool = False
    max_queued_requests: int | None = None  # waiting requests beyond this are refused (QueueFullError)
    seed: int = 0  # random weights of load_format "dummy", and the sampling of requests without a seed
    threads: int | None = None  # torch's intra-op threads, set once (default: torch's, the physical cores)
    show_progress: bool = True
    # Speculative decoding: vLLM's keys (``spec_decode/config.py``), as a dict, its JSON text or the config
    # itself; None (the default): off.
    speculative_config: SpeculativeConfig | dict | str | None = None
    # Decodes that sample alone (greedy, or at a temperature with no filter, penalty or grammar) run this many
    # steps ahead in one go when a step is nothing else (``decode_runs``, as vLLM's --num-scheduler-steps).
    # None: ``default_decode_run_steps``; 1: every step alone.
    decode_run_steps: int | None = None

    def __post_init__(self) -> None:
        """Messages name the Python parameter; the command line checks its flags itself, in its own words."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        def integer(name: str, optional: bool = True) -> None:
            value = getattr(self, name)
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")

        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "max_prefill_tokens_with_decodes",
            "block_size",
            "max_queued_requests",
            "threads",
            "decode_run_steps",
        ):
            integer(name)
        for name in ("max_num_seqs", "seed"):
            integer(name, optional=False)
        check(
            self.max_model_len is None or self.max_model_len >= 1,
            f"max_model_len must be positive, got {self.max_model_len}",
        )
        check(self.max_num_seqs >= 1, f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}",
        )
        check(
            self.max_prefill_tokens_with_decodes is None or self.max_prefill_tokens_with_decodes >= 1,
            f"max_prefill_tokens_with_decodes must be positive, got {self.max_prefill_tokens_with_decodes}",
        )
        check(
            self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0,
            f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}",
        )
        check(
            0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        check(
            0 < self.kv_cache_memory_fraction <= 1,
            f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}",
        )
        check(self.block_size is None or self.block_size >= 1, f"block_size must be positive, got {self.block_size}")
        check(self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}")
        check(
            self.decode_run_steps is None or self.decode_run_steps >= 1,
            f"decode_run_steps must be at least 1, got {self.decode_run_steps}",
        )
        check(
            self.max_queued_requests is None or self.max_queued_requests >= 0,
            f"max_queued_requests must be non-negative, got {self.max_queued_requests}",
        )
        self.speculative_config = SpeculativeConfig.from_user(self.speculative_config)

    def resolved_model(self) -> str:
        if self.model is not None:
            return self.model
        from clex_serve.assets import DEFAULT_MODEL_PATH

        return str(DEFAULT_MODEL_PATH)

    def resolved_max_model_len(self, config: ModelConfig) -> int:
        if self.max_model_len and self.max_model_len > config.max_model_len and not self.allow_long_max_model_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's limit of {config.max_model_len} tokens; "
                f"lower it, or pass allow_long_max_model_len=True (--allow-long-max-model-len) to go past the limit"
            )
        return self.max_model_len or config.max_model_len


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return min(int(line.split()[1]) * 1024, 4 * GIB)
    except OSError:
        pass
    return 4 * GIB


def _gpu_budget(engine: EngineConfig, device: torch.device, activation_bytes: int) -> int:
    """What ``gpu_memory_utilization`` of the card leaves for the KV pool after what is already held (weights,
    CUDA context, other processes) and the measured activation peak."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * engine.gpu_memory_utilization) - (total - free) - activation_bytes
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: {engine.gpu_memory_utilization:.2f} of {total / GIB:.1f} GiB, "
            f"{(total - free) / GIB:.1f} GiB already in use and {activation_bytes / GIB:.2f} GiB for activations; "
            f"raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return budget


def num_kv_blocks(
    engine: EngineConfig,
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    activation_bytes: int = 0,
) -> int:
    """``activation_bytes``: the measured activation peak (CUDA), kept out of the pool."""
    per_block = bytes_per_block(config, block_size, dtype)
    if engine.kv_cache_memory_gib is not None:
        budget = int(engine.kv_cache_memory_gib * GIB)
    elif device.type == "cuda":
        budget = _gpu_budget(engine, device, activation_bytes)
    else:
        budget = int(_available_ram() * engine.kv_cache_memory_fraction)
    # More than every sequence at full length is never used: cap there instead of holding memory.
    useful = engine.max_num_seqs * (-(-max_model_len // block_size))
    num_blocks = min(budget // per_block - 1, useful)  # one block of the budget is the pool's padding block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget ({budget / GIB:.3f} GiB) holds no block of {per_block} bytes; raise --kv-cache-memory"
        )
    return num_blocks

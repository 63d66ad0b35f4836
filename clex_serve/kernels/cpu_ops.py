"""The C++ CPU kernels (``csrc/``) as Python functions: the one module that calls ``torch.ops.clex_cpu``, as
vLLM's ``_custom_ops.py`` is for its kernels.

Each function is one op with the shapes and dtypes it takes; the op's file in ``csrc/`` says how it computes
what its PyTorch equivalent does. Callers decide once, where the model or the engine is built, whether the
kernels run (``cpu_extension.cpu_kernels_available``, ``KERNEL_DTYPES``); these functions check nothing
and assume the library is loaded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The dtypes every kernel takes (float16 and others stay on PyTorch's operators).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# ``decode_attention`` keeps a head's query and accumulators in registers: head dimensions and query heads
# per KV head up to these (every supported checkpoint; csrc/decode_attention.cpp's kMaxDim, kMaxGroup).
DECODE_MAX_HEAD_DIM = 256
DECODE_MAX_GROUP = 16
# ``prefill_attention``'s bounds (csrc/prefill_attention.cpp's kMaxDim, kMaxGroup).
PREFILL_MAX_HEAD_DIM = 256
PREFILL_MAX_GROUP = 64


def cpu_supported() -> bool:
    """The CPU has AVX2 and FMA, the least the kernels run on (each has an AVX-512 body too)."""
    return torch.ops.clex_cpu.cpu_supported()


def cpu_isa() -> str:
    """The instruction set the kernels run on now: ``"avx512"`` or ``"avx2"``."""
    return torch.ops.clex_cpu.cpu_isa()


def select_cpu_isa(isa: str) -> str:
    """Run the kernels' ``"avx2"`` bodies, or their ``"avx512"`` ones where the CPU has AVX-512; returns the
    one now in use. Weight layouts are chosen for the ISA at hand (``cpu_linear``): select before building."""
    return torch.ops.clex_cpu.select_cpu_isa(isa)


def vector_lanes() -> int:
    """float32 lanes of the kernels' vectors on the ISA in use."""
    return 16 if cpu_isa() == "avx512" else 8


def blocked_linear(
    x: torch.Tensor, blocked_weight: torch.Tensor, blocked_bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [M, K] contiguous times a weight in the blocked layout [ceil(N / 64), K, 64] (``cpu_linear.to_blocked``),
    plus the bias padded to whole blocks -> [M, out_features]; float32 accumulation for both dtypes."""
    return torch.ops.clex_cpu.blocked_linear(x, blocked_weight, blocked_bias, out_features)


def amx_gemm(
    x: torch.Tensor, pair_weight: torch.Tensor, blocked_bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """bfloat16 x [M, K] contiguous (K a multiple of 32) times a weight in the pair layout [ceil(N / 64), K / 2,
    64, 2] (``cpu_linear.to_pairs``) on AMX tiles, plus the bias padded to whole blocks -> [M, out_features];
    float32 sums, rounded once to bfloat16. Only where ``amx_bf16_supported()``."""
    return torch.ops.clex_cpu.amx_gemm(x, pair_weight, blocked_bias, out_features)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, hidden] (contiguous columns), weight [hidden] of x's dtype -> (norm(x + residual), the sum
    rounded to the dtype); without ``residual``, the second tensor is undefined."""
    return torch.ops.clex_cpu.rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a packed [rows, 2 * width] gate/up projection -> [rows, width]."""
    return torch.ops.clex_cpu.silu_and_mul(gate_up)


def rotate_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_scale: torch.Tensor | None,
    slots: torch.Tensor,
    flat_k_cache: torch.Tensor,
    flat_v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [N, Hq, D] and k [N, Hkv, D] with cos/sin [N, rotary_dim] (queries times ``query_scale`` [N],
    if given) and write k and v [N, Hkv, D] to ``slots`` [N] int64 of the [slots, Hkv, D] cache views ->
    (rotated queries, rotated keys)."""
    return torch.ops.clex_cpu.rotate_and_cache(q, k, v, cos, sin, query_scale, slots, flat_k_cache, flat_v_cache)


def decode_attention(
    q: torch.Tensor,
    flat_k_cache: torch.Tensor,
    flat_v_cache: torch.Tensor,
    runs: torch.Tensor,
    run_offsets: torch.Tensor,
    scale: float,
    row_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its cached runs: ``runs`` [R, 2] int64 slot ranges
    [start, end) of the [slots, Hkv, D] cache views, sequence b's rows ``run_offsets[b]:run_offsets[b + 1]``
    -> [B, Hq, D]. ``row_groups`` [G + 1] int64 offsets: rows ``row_groups[g]:row_groups[g + 1]`` are
    consecutive positions of one sequence (each row's runs a prefix of the next row's), attended together
    so that their keys are read once; every row's result is the one it has alone."""
    return torch.ops.clex_cpu.decode_attention(q, flat_k_cache, flat_v_cache, runs, run_offsets, scale, row_groups)


def prefill_attention(
    q: torch.Tensor, flat_k_cache: torch.Tensor, flat_v_cache: torch.Tensor, start: int, context: int, scale: float
) -> torch.Tensor:
    """A prompt chunk's queries q [L, Hq, D] over the one run of slots ``[start, start + context)`` of the
    [slots, Hkv, D] cache views that holds its cached prefix and its own keys, causal and aligned to the run's
    end (query i sees the keys up to ``context - L + i``) -> [L, Hq, D]. Grouped-query heads read their shared
    KV head in place."""
    return torch.ops.clex_cpu.prefill_attention(q, flat_k_cache, flat_v_cache, start, context, scale)


class DecodeLayerWeights(NamedTuple):
    """A Llama-family decoder layer's fixed arguments to ``llama_decode_layer``, in its schema's order:
    linear weights in the blocked layout, with their biases padded to whole blocks (or None)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int


def llama_decode_layer(
    hidden: torch.Tensor,
    weights: DecodeLayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_scale: torch.Tensor | None,
    slots: torch.Tensor,
    flat_k_cache: torch.Tensor,
    flat_v_cache: torch.Tensor,
    runs: torch.Tensor,
    run_offsets: torch.Tensor,
    row_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Llama-family decoder layer's output for hidden [B, hidden] contiguous, one token per row: the
    kernels of the layer-by-layer path in its order; the step's arguments as in ``rotate_and_cache`` and
    ``decode_attention``."""
    return torch.ops.clex_cpu.llama_decode_layer(
        hidden, *weights, cos, sin, query_scale, slots, flat_k_cache, flat_v_cache, runs, run_offsets, row_groups
    )


# A layer's tensors as ``llama_decode_step`` takes them, ten per layer, in this order.
DECODE_STEP_LAYER_FIELDS = (
    "input_norm",
    "post_norm",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "gate_up",
    "gate_up_bias",
    "down",
    "down_bias",
)


def llama_decode_step(
    ids: torch.Tensor,
    embedding: torch.Tensor,
    layers: list[torch.Tensor | None],
    shape: DecodeLayerWeights,
    final_norm: torch.Tensor,
    final_eps: float,
    head: torch.Tensor,
    head_bias: torch.Tensor | None,
    vocab: int,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    query_scale: torch.Tensor | None,
    slots: torch.Tensor,
    flat_k_caches: list[torch.Tensor],
    flat_v_caches: list[torch.Tensor],
    runs: torch.Tensor,
    run_offsets: torch.Tensor,
) -> torch.Tensor:
    """A pure decode step's float32 logits [B, vocab]: the embedding of ``ids``, the rotary rows of
    ``positions`` at ``inv_freq`` [1 or B, rotary_dim / 2], ``llama_decode_layer`` for every layer (``layers``:
    each layer's ten tensors in ``DECODE_STEP_LAYER_FIELDS``' order, ``shape`` the sizes and eps they share), the
    final RMSNorm and the head in the blocked layout; the step's other arguments as ``llama_decode_layer``
    takes them, with each layer's cache views in order."""
    return torch.ops.clex_cpu.llama_decode_step(
        ids,
        embedding,
        layers,
        shape.eps,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.hidden_size,
        shape.intermediate_size,
        final_norm,
        final_eps,
        head,
        head_bias,
        vocab,
        positions,
        inv_freq,
        attention_scaling,
        query_scale,
        slots,
        flat_k_caches,
        flat_v_caches,
        runs,
        run_offsets,
    )


def llama_decode_run(
    ids: torch.Tensor,
    embedding: torch.Tensor,
    layers: list[torch.Tensor | None],
    shape: DecodeLayerWeights,
    final_norm: torch.Tensor,
    final_eps: float,
    head: torch.Tensor,
    head_bias: torch.Tensor | None,
    vocab: int,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    query_scales: torch.Tensor | None,
    slots: torch.Tensor,
    flat_k_caches: list[torch.Tensor],
    flat_v_caches: list[torch.Tensor],
    runs: torch.Tensor,
    run_offsets: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    greedy_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``slots.shape[0]`` decode steps in one call -> their tokens [steps, B] int64: step j is
    ``llama_decode_step`` at ``positions + j`` with row j of ``query_scales``, ``slots`` and ``run_offsets``
    ([steps, B + 1], into ``runs``), fed the tokens step j - 1 picked (step 0 is fed ``ids``): the argmax
    (``argmax_rows``), or with ``temperatures`` [B] float32 and ``uniforms`` [steps, B] float64,
    ``sample_rows`` with row j of the uniforms, and the argmax where ``greedy_rows`` [B] bool is set."""
    return torch.ops.clex_cpu.llama_decode_run(
        ids,
        embedding,
        layers,
        shape.eps,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.hidden_size,
        shape.intermediate_size,
        final_norm,
        final_eps,
        head,
        head_bias,
        vocab,
        positions,
        inv_freq,
        attention_scaling,
        query_scales,
        slots,
        flat_k_caches,
        flat_v_caches,
        runs,
        run_offsets,
        temperatures,
        uniforms,
        greedy_rows,
    )


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place, in each of ``rows``: logits [B, V] float32 contiguous become -inf where the row's bit in
    ``bitmask`` [>= B, ceil(V / 32)] int32 (xgrammar's layout) is clear."""
    torch.ops.clex_cpu.apply_token_bitmask(logits, bitmask, rows)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of [B, V] float32 contiguous logits -> [B] int64 (ties and NaNs as torch)."""
    return torch.ops.clex_cpu.argmax_rows(logits)


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of [B, V] float32 contiguous logits from softmax(logits / T): the inverse of its
    cumulative distribution at ``uniforms`` [B] float64 in [0, 1); temperatures [B] float32 > 0 -> [B] int64."""
    return torch.ops.clex_cpu.sample_rows(logits, temperatures, uniforms)


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    in_prompt: torch.Tensor,
    picked: torch.Tensor,
    table_rows: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> None:
    """Repetition, frequency and presence penalties on rows ``picked`` [P] of [B, V] float32 contiguous
    logits, in place; their counts and prompt flags are rows ``table_rows`` [P] of ``output_counts`` [R, V]
    int32 and ``in_prompt`` [R, V] bool; the penalties [P] float32 each."""
    torch.ops.clex_cpu.apply_penalties(
        logits, output_counts, in_prompt, picked, table_rows, repetition, frequency, presence
    )


def bf16_dot_supported() -> bool:
    """The CPU has AVX512_BF16 (``vdpbf16ps``: bfloat16 pairs multiplied and summed into float32)."""
    return torch.ops.clex_cpu.bf16_dot_supported()


def bf16_dot_at_fma_rate() -> bool:
    """``vdpbf16ps`` issues as often as a float32 FMA here (twice the work per instruction; measured once)."""
    return torch.ops.clex_cpu.bf16_dot_at_fma_rate()


def bf16_dot_rows() -> int:
    """bfloat16 linear calls of up to this many rows take ``vdpbf16ps``, larger ones float32 FMAs (every row
    count where ``bf16_dot_at_fma_rate``, else 2)."""
    return torch.ops.clex_cpu.bf16_dot_rows()


def select_bf16_dot_rows(rows: int) -> int:
    """Set ``bf16_dot_rows`` (0: FMAs at every count), for tests and measurements."""
    return torch.ops.clex_cpu.select_bf16_dot_rows(rows)


def stream_read(data: torch.Tensor) -> float:
    """Every torch thread sums its own share of ``data`` (float32, contiguous) with 64-byte loads; the sum."""
    return torch.ops.clex_cpu.stream_read(data)


def fma_peak(iterations: int) -> float:
    """Every torch thread runs ``iterations`` x 24 float32 FMAs of ``vector_lanes()`` lanes on registers (2
    FLOPs a lane)."""
    return torch.ops.clex_cpu.fma_peak(iterations)


def bf16_dot_peak(iterations: int) -> float:
    """Every torch thread runs ``iterations`` x 24 ``vdpbf16ps`` of 16 lanes on registers (4 FLOPs a lane)."""
    return torch.ops.clex_cpu.bf16_dot_peak(iterations)


def amx_bf16_supported() -> bool:
    """The CPU has AMX bfloat16 tiles and the OS grants this process their state."""
    return torch.ops.clex_cpu.amx_bf16_supported()


def amx_bf16_peak(iterations: int) -> float:
    """Every torch thread runs ``iterations`` x 4 ``tdpbf16ps`` tile multiplies (16,384 FLOPs each)."""
    return torch.ops.clex_cpu.amx_bf16_peak(iterations)

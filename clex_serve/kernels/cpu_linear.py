"""Linear layers on the CPU with their weights laid out once for the rows they will see.

A decode step multiplies a few rows (one per stream) by every weight: it is bound by reading the weights.
``F.linear`` reads them far below what the memory allows at a few rows, bfloat16 at about half the speed of
float32, so a bfloat16 model decoded no faster than a float32 one. Two layouts, chosen per call by the
number of rows:

- **blocked** (``csrc/blocked_linear.cpp``, where the CPU kernels build): ``[N / 64, K, 64]``, streamed by
  an AVX-512 or AVX2 kernel at memory speed for both dtypes; bfloat16 where the CPU has AVX512_BF16 in input pairs,
  ``[N / 64, K / 2, 64, 2]``, multiplied as stored by ``vdpbf16ps`` (``csrc/bf16_pair_linear.cpp``), else
  widened in registers. Larger float32 batches (long prompts) copy the plain weight out of its blocks per
  call and run MKL's GEMM on it (a 7,000-token prompt: 160 ms a layer against 217 for ``torch.matmul``
  over the blocks; the copy is a few MB), or from 512 rows oneDNN's on that copy packed for it (1.35-1.5x
  MKL's on Zen 4, the packing included), so float32 keeps one copy of its weights.
- **oneDNN packed** (``torch.ops.mkldnn``, weights reordered ahead of time as vLLM's CPU backend and
  inductor's freezing do): bfloat16 batches of more rows than the blocked kernel handles well run on the
  CPU's bf16 matrix units. bfloat16 therefore keeps both layouts, the bytes of one float32 copy, except
  where the CPU has AMX: there prompts run on the tiles from the pair layout (``csrc/amx_gemm.cpp``, about
  as fast as oneDNN: up to 6% slower on a 7,000-token prompt) and bfloat16 keeps one copy. Without the CPU
  kernels oneDNN's is the only layout (float32 then keeps the plain weight too, for MKL's GEMV at one row).
  Where oneDNN has no bfloat16 path (AVX2 CPUs) bfloat16 keeps only the blocked layout and runs long
  prompts on MKL's float32 GEMM over the weight widened per call (docs/cpu.md, "On AVX2 CPUs").

Measured on the benchmark model's weights (8 layers of a 58M Llama plus its 32000-word head, 2 threads):
one row in bfloat16 5.5 ms blocked against 7.6 oneDNN and 10.9 ``F.linear``; float32 blocked equals the
best of the others up to 64 rows, and against ``torch.matmul`` on the same blocks (the 8 layers' linears)
takes 0.76-0.91 of its time at every count from 16 to 1,024 rows (31.5 against 35.7 ms at 84, a step of 16
decodes and two chat prompts), so it takes float32 batches up to 256 rows: every mixed step, and short
prompts alone; bfloat16 oneDNN overtook the widening kernel from 7-8 rows (6.6 against 7.3 ms at 8),
the AMX tiles on the pair layout (``csrc/amx_pair_linear.cpp``) take up to 16 rows faster than oneDNN.
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.huge_pages import HugePageArena
from clex_serve.layers.linear import PackedLinear
from clex_serve.layers.replace import replace_modules

BLOCK = 64  # outputs per block of the blocked layout (four AVX-512 vectors, eight AVX2 ones)
# Most rows per call that go through the blocked kernel, per dtype (measured crossovers, above).
BLOCKED_MAX_ROWS = {torch.float32: 256, torch.bfloat16: 6}
# bfloat16 in pairs where the CPU has AMX: the kernel takes up to 16 rows (one tile's), past oneDNN's speed.
AMX_MAX_ROWS = 16
# bfloat16 where oneDNN has no bf16 path (AVX2 CPUs): the blocked kernel up to this many rows (F.linear in
# bfloat16 is 2.7-7.5x slower at every count), past them MKL's float32 GEMM on the weight widened per call
# (8 layers of the benchmark model: the kernel 87 against 100 ms at 256 rows, 632 against 415 at 1,024).
BLOCKED_MAX_ROWS_WITHOUT_ONEDNN_BF16 = 256
# bfloat16 weights in input pairs for vdpbf16ps where the CPU has AVX512_BF16 (else the widening layout).
BF16_PAIRS = True
# bfloat16 in pairs where vdpbf16ps issues as often as an FMA (Zen 4): the kernel takes up to this many rows,
# at or past oneDNN's speed (8 layers and the head of the benchmark model, ms, kernel / oneDNN: 16 rows 4.9 /
# 6.0, 64 rows 14.2 / 15.1, 256 rows 50.6 / 51.4); longer prompts go to oneDNN's GEMM.
BLOCKED_MAX_ROWS_AT_DOT_RATE = 256
# float32 rows from which a GEMM runs on oneDNN (the weight packed for it each call, after the copy out of
# the blocks) rather than on MKL: one layer of the benchmark model (4 matrices), 2 Zen 4 threads, medians of
# seven alternating runs, MKL / oneDNN with its packing: 300 rows 20.7 / 22.3 ms, 1,024 rows 62.2 / 46.0,
# 3,000 rows 178 / 121 (108 against 159 GFLOP/s).
ONEDNN_FLOAT32_MIN_ROWS = 512
# The row count oneDNN tunes its packed layout for; any count runs, this is a common decode batch.
_ONEDNN_ROWS_HINT = 16


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear serves ``dtype`` here: bfloat16 only where oneDNN has a bf16 path on this CPU
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2 CPU its reorder refuses bfloat16 weights)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def to_blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 64), K, 64], the last block padded with zero rows."""
    rows, cols = weight.shape
    padded = torch.cat([weight, weight.new_zeros(-rows % BLOCK, cols)]) if rows % BLOCK else weight
    return padded.view(-1, BLOCK, cols).transpose(1, 2).contiguous()


def unblocked(blocked: torch.Tensor, out_features: int) -> torch.Tensor:
    """The plain [N, K] weight of a blocked one (not in pairs), copied out (a few MB: a long prompt's GEMM
    over it takes a hundred times as long)."""
    return blocked.transpose(1, 2).reshape(-1, blocked.shape[1])[:out_features]


class CpuLinear(nn.Module):
    """An ``nn.Linear`` on the CPU with its weight in the layouts above, made once from the layer it replaces
    (``replace_cpu_linear_layers``). ``weight`` is the plain weight where something still reads it (a tied
    embedding, float32 without the blocked kernel), else an empty parameter of its dtype. ``arena``: where the
    blocked weight, which every decode step streams, is put (2 MB pages, ``huge_pages``); else the heap."""

    def __init__(
        self, linear: nn.Linear, blocked: bool, onednn: bool, keep_plain: bool, arena: HugePageArena | None = None
    ) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.blocked_weight: torch.Tensor | None = None
        if blocked:
            pairs = weight.dtype == torch.bfloat16 and BF16_PAIRS and cpu_ops.bf16_dot_supported()
            self.blocked_weight = to_pairs(weight) if pairs else to_blocked(weight)
            if arena is not None:
                self.blocked_weight = arena.copy(self.blocked_weight)
        self.blocked_bias: torch.Tensor | None = None
        if blocked and linear.bias is not None:
            self.blocked_bias = to_blocked(linear.bias.detach()[:, None]).flatten()
        # bfloat16 pairs on AMX: every row count runs on the tiles from this one layout (3-16 rows as a decode
        # step, more as a prompt's GEMM), so no oneDNN copy is kept.
        self.amx = (
            self.blocked_weight is not None
            and self.blocked_weight.dim() == 4
            and self.in_features % 32 == 0
            and cpu_ops.amx_bf16_supported()
        )
        self.packed_weight: torch.Tensor | None = None
        if onednn and not self.amx and (not blocked or weight.dtype == torch.bfloat16):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_ROWS_HINT)
        # The plain copy, where nothing reads it, keeps a parameter of its dtype without its bytes.
        self.weight = linear.weight if keep_plain else nn.Parameter(weight.new_empty(0), requires_grad=False)
        self.max_blocked_rows = AMX_MAX_ROWS if self.amx else BLOCKED_MAX_ROWS[weight.dtype]
        pairs_at_dot_rate = self.blocked_weight is not None and self.blocked_weight.dim() == 4 and not self.amx
        if pairs_at_dot_rate and cpu_ops.bf16_dot_at_fma_rate():
            self.max_blocked_rows = BLOCKED_MAX_ROWS_AT_DOT_RATE
        # bfloat16 blocked without oneDNN's bf16 path: larger batches widen the weight for MKL's GEMM.
        self.widened_gemm = (
            self.blocked_weight is not None and weight.dtype == torch.bfloat16 and not self.amx and not onednn
        )
        if self.widened_gemm:
            self.max_blocked_rows = BLOCKED_MAX_ROWS_WITHOUT_ONEDNN_BF16
        # float32 prompts of many rows: oneDNN's GEMM on the weight packed per call, where it is faster.
        self.onednn_float32_prompts = self.blocked_weight is not None and weight.dtype == torch.float32 and onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        if self.blocked_weight is not None and count <= self.max_blocked_rows:
            out = cpu_ops.blocked_linear(rows.contiguous(), self.blocked_weight, self.blocked_bias, self.out_features)
        elif self.amx:
            out = cpu_ops.amx_gemm(rows.contiguous(), self.blocked_weight, self.blocked_bias, self.out_features)
        elif self.packed_weight is not None:
            if count == 1 and self.weight.numel():
                out = nn.functional.linear(rows, self.weight, self.bias)  # float32 single row: MKL's GEMV
            else:
                out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        elif self.widened_gemm:
            out = self._widened_gemm(rows)
        else:  # float32 past the blocked kernel's rows: a GEMM on the weight copied out of its blocks
            weight = unblocked(self.blocked_weight, self.out_features)
            if self.onednn_float32_prompts and count >= ONEDNN_FLOAT32_MIN_ROWS:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, count)
                out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
            else:
                out = nn.functional.linear(rows, weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _widened_gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """bfloat16 rows times the weight widened to float32, float32 sums (and bias) rounded once to
        bfloat16, as the blocked kernel rounds: a prompt's GEMM on the float32 units where oneDNN has no bf16
        path (1,024 rows through 8 layers of the benchmark model's linear layers: 0.41 s against 2.7 s for
        F.linear in bfloat16)."""
        weight = unblocked(self.blocked_weight, self.out_features).float()
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(rows.float(), weight, bias).to(rows.dtype)


class CpuPackedLinear(CpuLinear):
    """A ``PackedLinear`` (q/k/v, gate/up) on the CPU: the same, and its projections split apart."""

    def __init__(
        self, linear: PackedLinear, blocked: bool, onednn: bool, keep_plain: bool, arena: HugePageArena | None = None
    ) -> None:
        super().__init__(linear, blocked, onednn, keep_plain, arena)
        self.shard_sizes = dict(linear.shard_sizes)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(self.shard_sizes.values()), dim=-1)


def replace_cpu_linear_layers(model: nn.Module, shared: set[int] = frozenset(), blocked: bool | None = None) -> int:
    """Swap every float32/bfloat16 ``nn.Linear`` of ``model`` (``PackedLinear`` included) for its ``CpuLinear``;
    returns how many were swapped (none on a second call). ``shared``: ids of weights used elsewhere (a tied
    input embedding), which keep their plain tensor. ``blocked``: use the blocked kernel (default: where the
    CPU kernels build)."""
    if blocked is None:
        blocked = cpu_kernels_available()
    arena = HugePageArena()  # the model's blocked weights side by side in 2 MB pages

    def replacement(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Linear) or module.weight.dtype not in cpu_ops.KERNEL_DTYPES:
            return None
        dtype = module.weight.dtype
        onednn = onednn_available(dtype)
        if not blocked and not onednn:
            return None  # F.linear stays (bfloat16 on an AVX2 CPU without the kernels)
        # The plain weight serves F.linear: a tied embedding; float32 without the blocked kernel (MKL's GEMV
        # at one row).
        keep_plain = id(module.weight) in shared or (not blocked and dtype == torch.float32)
        kind = CpuPackedLinear if isinstance(module, PackedLinear) else CpuLinear
        return kind(module, blocked, onednn, keep_plain, arena)

    return replace_modules(model, replacement)


def to_pairs(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16 -> [ceil(N / 64), ceil(K / 2), 64, 2]: the blocked layout with adjacent inputs side by
    side, as ``vdpbf16ps`` takes them (``csrc/bf16_pair_linear.cpp``); padded with zero rows and a zero column."""
    rows, cols = weight.shape
    padded = nn.functional.pad(weight, (0, cols % 2, 0, -rows % BLOCK))
    return padded.view(-1, BLOCK, (cols + 1) // 2, 2).transpose(1, 2).contiguous()

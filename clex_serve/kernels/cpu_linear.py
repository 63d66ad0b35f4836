"""Linear layers on the CPU with their weights laid out once for the rows they will see.

A decode step multiplies a few rows (one per stream) by every weight: it is bound by reading the weights.
``F.linear`` reads them far below what the memory allows at a few rows, bfloat16 at about half the speed of
float32, so a bfloat16 model decoded no faster than a float32 one. Two layouts, chosen per call by the
number of rows:

- **blocked** (``csrc/blocked_linear.cpp``, where the CPU kernels build): ``[N / 64, K, 64]``, streamed by
  an AVX-512 kernel that widens bfloat16 in registers, at memory speed for both dtypes. Larger float32
  batches (long prompts) multiply the same blocks with ``torch.matmul``, within ~15% of oneDNN, so float32
  keeps one copy of its weights.
- **oneDNN packed** (``torch.ops.mkldnn``, weights reordered ahead of time as vLLM's CPU backend and
  inductor's freezing do): bfloat16 batches of more rows than the blocked kernel handles well run on the
  CPU's bf16 matrix units. bfloat16 therefore keeps both layouts, the bytes of one float32 copy. Without
  the CPU kernels it is the only layout (float32 then keeps the plain weight too, for MKL's GEMV at one row).

Measured on the benchmark model's weights (8 layers of a 58M Llama plus its 32000-word head, 2 threads):
one row in bfloat16 5.5 ms blocked against 7.6 oneDNN and 10.9 ``F.linear``; float32 blocked equals the
best of the others up to 64 rows, and against ``torch.matmul`` on the same blocks (the 8 layers' linears)
takes 0.76-0.91 of its time at every count from 16 to 1,024 rows (31.5 against 35.7 ms at 84, a step of 16
decodes and two chat prompts), so it takes float32 batches up to 256 rows: every mixed step, and short
prompts alone; bfloat16 oneDNN overtakes blocked from 7-8 rows (6.6 against 7.3 ms at 8).
"""

from __future__ import annotations

import torch
from torch import nn

from clex_serve.kernels.cpu_extension import cpu_kernels_available

BLOCK = 64  # outputs per block of the blocked layout (the kernel's four AVX-512 vectors)
# Most rows per call that go through the blocked kernel, per dtype (measured crossovers, above).
BLOCKED_MAX_ROWS = {torch.float32: 256, torch.bfloat16: 6}
# The row count oneDNN tunes its packed layout for; any count runs, this is a common decode batch.
_ONEDNN_ROWS_HINT = 16


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def to_blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 64), K, 64], the last block padded with zero rows."""
    rows, cols = weight.shape
    padded = torch.cat([weight, weight.new_zeros(-rows % BLOCK, cols)]) if rows % BLOCK else weight
    return padded.view(-1, BLOCK, cols).transpose(1, 2).contiguous()


def blocked_matmul(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x [M, K] times the blocked weight with torch's batched matmul (one block per batch) -> [M, N]."""
    out = torch.matmul(x, blocked).transpose(0, 1).reshape(x.shape[0], -1)  # [M, blocks * 64]
    if bias is not None:
        out = out + bias
    return out[:, :out_features]


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if self.blocked_weight is not None and count <= BLOCKED_MAX_ROWS[rows.dtype]:
        out = torch.ops.clex_cpu.blocked_linear(rows.contiguous(), self.blocked_weight, self.blocked_bias,
                                                self.out_features)
    elif self.packed_weight is not None:
        if count == 1 and self.weight.numel():
            out = nn.functional.linear(rows, self.weight, self.bias)  # float32 single row: MKL's GEMV
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
    else:
        out = blocked_matmul(rows, self.blocked_weight, self.blocked_bias, self.out_features)
    return out.view(*x.shape[:-1], self.out_features)


def prepare_cpu_linear_layers(model: nn.Module, shared: set[int] = frozenset(), blocked: bool | None = None) -> int:
    """Lay out every CPU float32/bfloat16 ``nn.Linear`` of ``model`` for fast multiplies, in place; returns
    how many were changed. ``shared``: ids of weights used elsewhere (a tied input embedding), which keep
    their plain tensor. ``blocked``: use the blocked kernel (default: where the CPU kernels build)."""
    if blocked is None:
        blocked = cpu_kernels_available()
    onednn = onednn_available()
    if not blocked and not onednn:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or hasattr(module, "blocked_weight"):
            continue
        weight = module.weight.detach()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        module.blocked_weight = module.blocked_bias = module.packed_weight = None
        if blocked:
            module.blocked_weight = to_blocked(weight)
            if module.bias is not None:
                module.blocked_bias = to_blocked(module.bias.detach()[:, None]).flatten()
        if onednn and (not blocked or weight.dtype == torch.bfloat16):
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_ROWS_HINT)
        keep_plain = id(module.weight) in shared or (not blocked and weight.dtype == torch.float32)
        if not keep_plain:
            # The plain copy is no longer read: keep a parameter of its dtype, without its bytes.
            module.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        module.forward = _forward.__get__(module)
        changed += 1
    return changed

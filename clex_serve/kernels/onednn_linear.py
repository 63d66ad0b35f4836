"""Linear layers on the CPU through oneDNN with weights packed once, as vLLM's CPU backend and inductor's
freezing do.

``F.linear`` on the CPU multiplies a few rows (a decode step of a few streams) far below what the memory
allows: with 16 rows it takes three times as long as with one, and in bfloat16 it runs at about half the
bandwidth of float32. oneDNN with its weights reordered ahead of time into its blocked layout keeps a step
of 16 rows within a factor 2 of one row and runs bfloat16 on the CPU's bf16 units. The packed weight
replaces the plain one (same bytes), except where the input embedding shares it, and in float32, where a
single row (one stream decoding) is about 20% faster through MKL's GEMV on the plain weight: float32 keeps
both, twice the weight memory, for the fastest path at every batch size (bfloat16 is the dtype to use where
memory is short).
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN tunes the packed layout for; any count runs, this is the common decode batch.
_ROWS_HINT = 16


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1 and self.weight.numel():
        return nn.functional.linear(x, self.weight, self.bias)  # float32 single row: MKL's GEMV is faster
    out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_linear_layers(model: nn.Module, shared: set[int] = frozenset()) -> int:
    """Pack every CPU float32/bfloat16 ``nn.Linear`` of ``model`` in place; returns how many were packed.
    ``shared``: ids of weight tensors used elsewhere (a tied input embedding), which stay in place too."""
    packed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or hasattr(module, "packed_weight"):
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
        module.forward = _packed_forward.__get__(module)
        if id(weight) not in shared and weight.dtype != torch.float32:
            # The plain copy is no longer read: keep a parameter of its dtype, without its bytes.
            module.weight = nn.Parameter(weight.detach().new_empty(0), requires_grad=False)
        packed += 1
    return packed

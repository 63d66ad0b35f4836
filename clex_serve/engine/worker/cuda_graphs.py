"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (nano-vllm's and vLLM's scheme).

A decode step of a 7B model is a few hundred small kernels; launched from Python one by one, their launch
costs exceed the time the GPU needs to read the weights. A captured graph launches them all at once.

Everything that changes between steps lives in persistent input buffers that the graph reads: token ids,
positions, cache slots, context lengths, block tables, and each sequence's *scale row*. The rotary tables are
built inside the graph by gathering each sequence's row of the rope's scale table and multiplying by its
position, and the CLEX log scale comes from the context lengths, so a sequence whose CLEX scale changes
needs no recapture: the runner re-rotates its cached keys eagerly, then points its scale row elsewhere.

A batch runs in the smallest bucket that holds it; the rows that pad it write their K/V into the pool's
padding block and attend only to it.
"""

from __future__ import annotations

import torch

from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.engine.worker.kv_cache import KVCachePool
from clex_serve.models.base import CausalLM


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (and ``max_batch_size`` itself)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class DecodeCudaGraphs:
    def __init__(
        self,
        model: CausalLM,
        backend,
        kv_cache: KVCachePool,
        scale_table: torch.Tensor,
        max_batch_size: int,
        max_blocks_per_sequence: int,
        dtype: torch.dtype,
        log_scale_divisor: float | None,
    ) -> None:
        """``scale_table`` [num_scales, rotary_dim / 2]: row ``scale - 1`` holds that scale's inverse
        frequencies. ``log_scale_divisor``: log(L0) when the model applies the CLEX log scale, else None."""
        self.model = model
        self.backend = backend
        self.kv_caches = kv_cache.layer_views
        padding_block, padding_slot, block_size = kv_cache.padding_block, kv_cache.padding_slot, kv_cache.block_size
        self.scale_table = scale_table
        self.padding_block = padding_block
        self.padding_slot = padding_slot
        self.block_size = block_size
        self.dtype = dtype
        self.log_scale_divisor = log_scale_divisor
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        device = scale_table.device
        self.pin_host_inputs = device.type == "cuda"  # copied from pinned memory, without waiting
        rows = self.batch_sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(rows, dtype=torch.long, device=device)
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.scale_rows = torch.zeros(rows, dtype=torch.long, device=device)
        self.block_tables = torch.full((rows, max_blocks_per_sequence), padding_block, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)
        # Empty until ``capture``: then ``run`` executes the same buffered computation eagerly (on the CPU,
        # where tests check it against the plain eager path).
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, the largest first, sharing one memory pool (a smaller batch's activations fit
        in the largest's)."""
        self._pad_rows(0, self.max_batch_size)
        pool = None
        for batch_size in reversed(self.batch_sizes):
            self.forward(batch_size)  # warm up: Triton compiles, cuBLAS picks its kernels, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch_size] = self.forward(batch_size)
            pool = graph.pool()
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def forward(self, batch_size: int) -> torch.Tensor:
        """The captured computation: next-token logits [batch_size, vocab] float32 from the input buffers."""
        positions = self.positions[:batch_size]
        context_lens = self.context_lens[:batch_size]
        inv_freq = self.scale_table[self.scale_rows[:batch_size]]
        cos, sin = self.model.rotary_emb.cos_sin(positions, inv_freq)
        query_scale = None
        if self.log_scale_divisor is not None:
            factors = torch.log(context_lens.float()) / self.log_scale_divisor
            query_scale = factors.to(self.dtype)[:, None, None]
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=self.slot_mapping[:batch_size],
            cos=cos.to(self.dtype),
            sin=sin.to(self.dtype),
            query_scale=query_scale,
            query_lens=[1] * batch_size,
            context_lens_host=None,
            context_lens=context_lens,
            block_tables=self.block_tables[:batch_size],
            cu_seqlens_q=self.cu_seqlens_q[: batch_size + 1],
            block_size=self.block_size,
            is_decode=True,
            kv_caches=self.kv_caches,
            backend=self.backend,
        )
        self.backend.prepare(meta)
        hidden = self.model(self.input_ids[:batch_size], meta)
        return self.model.compute_logits(hidden).float()

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        scales: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step of ``len(input_ids)`` sequences; returns their logits [B, vocab] float32 (a view
        of the graph's output buffer, valid until the next replay)."""
        batch = len(input_ids)
        bucket = next(size for size in self.batch_sizes if size >= batch)
        width = max(len(table) for table in block_tables)
        # One host tensor and one copy for the per-sequence scalars; the block tables, ragged, in a second.
        scalars = torch.tensor(
            [input_ids, positions, slot_mapping, [p + 1 for p in positions], [scale - 1 for scale in scales]],
            dtype=torch.long,
        )
        tables = torch.tensor(
            [table + [self.padding_block] * (width - len(table)) for table in block_tables], dtype=torch.int32
        )
        device = self.input_ids.device
        scalars = scalars.pin_memory().to(device, non_blocking=True) if self.pin_host_inputs else scalars
        self.input_ids[:batch].copy_(scalars[0])
        self.positions[:batch].copy_(scalars[1])
        self.slot_mapping[:batch].copy_(scalars[2])
        self.context_lens[:batch].copy_(scalars[3])
        self.scale_rows[:batch].copy_(scalars[4])
        self.block_tables[:batch, :width].copy_(tables, non_blocking=True)
        self._pad_rows(batch, bucket)
        if not self.graphs:
            return self.forward(bucket)[:batch]
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

    def _pad_rows(self, start: int, end: int) -> None:
        """Rows ``start..end`` hold no sequence: one token at position 0 in the padding block."""
        if start >= end:
            return
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self.padding_slot
        self.context_lens[start:end] = 1
        self.scale_rows[start:end] = 0
        self.block_tables[start:end, 0] = self.padding_block

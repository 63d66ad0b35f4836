"""Run one forward step (prefill or decode) for a batch of sequences against the paged KV cache.

Each sequence carries its own rotary scale, as the scheduler planned it: the runner brings its cached keys
to that scale when it changed (once, in place), builds per-token cos/sin from per-sequence frequency rows,
and applies the CLEX log scale to queries where the config asks for it. On CUDA, decode
steps replay captured graphs (``cuda_graphs``); prefill and re-rotation stay eager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clex_serve.attention.backend import AttentionBackend
from clex_serve.attention.cache_layout import CacheLayout
from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.attention.selector import default_block_size, get_attention_backend
from clex_serve.engine.worker.cache_rotation import Rerotation, rerotate_all
from clex_serve.engine.worker.cuda_graphs import DecodeCudaGraphs
from clex_serve.engine.worker.kv_cache import KVCachePool
from clex_serve.engine.worker.sampler import RunSampling
from clex_serve.kernels.cpu_decode_step import CpuDecodeStep
from clex_serve.kernels.device_layers import use_device_layers
from clex_serve.loading.loader import LoadedModel


@dataclass
class SequenceStep:
    """One sequence's share of a step."""

    token_ids: list[int]  # the new tokens to run
    num_cached: int  # tokens of this sequence already in the cache; the new ones start at this position
    block_table: list[int]  # cache blocks holding positions 0.. (enough for num_cached + new tokens)
    cache_scale: int = 1  # the rotary scale the cached keys carry (irrelevant when num_cached == 0)
    all_logits: bool = False  # return logits for every new token (prompt logprobs), not only the last
    # The length whose scale (and log scale) the step rotates with; None: the length after the step. A
    # prompt computed in several chunks uses its full length, so the chunks equal one pass.
    scale_len: int | None = None
    # log_scale per query from its own length: replaying tokens that were decoded one at a time.
    per_token_scale: bool = False
    # The scale to rotate with, as the scheduler planned it (direct users, such as evaluation, ask the
    # rope: ``rope.scale_for_length(step.rotary_len)``); the cached keys are re-rotated from ``cache_scale``
    # first when the two differ. Required: the runner decides no scale.
    scale: int | None = None
    # ``block_table`` as [first_block, count] runs, as the block manager keeps them (None: found here).
    block_runs: list[list[int]] | None = None
    # Run each token as a decode of its own (verifying drafts): token j attends the cache up to itself, at
    # the length it makes, and every token's logits come back (``StepResult.row_logits``).
    decode_rows: bool = False

    @property
    def total_len(self) -> int:
        return self.num_cached + len(self.token_ids)

    @property
    def rotary_len(self) -> int:
        return self.scale_len or self.total_len

    def check_blocks(self, block_size: int) -> None:
        """The block table holds every position the step writes."""
        if len(self.block_table) * block_size < self.total_len:
            raise ValueError("block table too short for the sequence: allocate blocks before running")

    @property
    def is_plain_decode(self) -> bool:
        """One new token rotated at its own length: the step a captured decode graph computes."""
        return (
            len(self.token_ids) == 1
            and not self.all_logits
            and not self.per_token_scale
            and self.rotary_len == self.total_len
        )


@dataclass
class StepResult:
    last_logits: torch.Tensor  # [B, vocab] float32: next-token logits of each sequence
    # index -> [new tokens, hidden] final hidden states, for sequences that asked for every token's logits.
    # Kept as hidden states because [tokens, vocab] logits of a long prompt do not fit in memory at once.
    all_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    compute_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    # index -> [new tokens, vocab] float32 logits of every token, for sequences run as ``decode_rows``.
    row_logits: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def all_logits(self) -> dict[int, torch.Tensor]:
        """index -> [new tokens, vocab] float32 logits (materialised whole: for short sequences)."""
        return {index: self.compute_logits(hidden).float() for index, hidden in self.all_hidden.items()}


class ModelRunner:
    """One per model: chooses the attention backend and block size once and swaps the model's layers for the
    device's (``device_layers``), profiles a step's memory (CUDA), then holds the KV pool it is given
    (``allocate_kv_cache``) and runs steps against it."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int | None = None,
        block_size: int | None = None,
        attention_backend: str = "auto",
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        """``num_blocks`` allocates the KV pool at once (direct use; the engine profiles first and allocates
        then). ``max_num_seqs`` and ``max_model_len`` size the CUDA graphs' buffers; ``enforce_eager`` turns
        the graphs off (vLLM's flag)."""
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.backend: AttentionBackend = get_attention_backend(
            attention_backend, self.device, self.config.sliding_window, self.dtype
        )
        use_device_layers(self.model, self.device, self.dtype, self.backend)
        # Pure decode steps of a model whose layers all fused, in one call (the CPU's decode graph).
        self.cpu_decode = CpuDecodeStep.for_model(self.model, self.backend) if self.device.type == "cpu" else None
        self.block_size = block_size or default_block_size(self.backend)
        self.rope = self.model.rotary_emb
        self._log_base = torch.log(torch.tensor(float(self.config.max_position_embeddings)))
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or self.config.max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache: KVCachePool | None = None
        self.decode_graphs: DecodeCudaGraphs | None = None
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)

    @property
    def cache_layout(self) -> CacheLayout:
        """What the attention backend declared it needs of the cache: the pool's layout, and (for the block
        manager) whether sequences are kept contiguous."""
        return self.backend.cache_layout

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        """The pool steps run against, and (on CUDA, unless eager) the decode graphs captured over it."""
        self.decode_graphs = None
        self.kv_cache = None  # the old pool's memory is free before the new one is taken
        self.kv_cache = KVCachePool(
            self.config, num_blocks, self.block_size, self.dtype, self.device, head_major=self.cache_layout.head_major
        )
        if capture_graphs and not self.enforce_eager and self.device.type == "cuda" and self.cuda_graphs_supported():
            self.enable_decode_graphs()

    def profile_peak_memory(self, max_prefill_tokens: int) -> int:
        """Bytes of activation memory at the peak of (a) one prefill of ``max_prefill_tokens`` tokens and (b)
        one eager decode step of ``max_num_seqs`` sequences, added: decode graphs keep their own memory pool
        (vLLM's profile run, on dummy tokens and a temporary pool of just these tokens; CUDA only). The
        pool is released afterwards: the caller sizes the real one from what is left."""
        decode_len = 2
        prefill_blocks = list(range(-(-max_prefill_tokens // self.block_size)))
        decode_tables = [[len(prefill_blocks) + index] for index in range(self.max_num_seqs)]
        self.allocate_kv_cache(
            len(prefill_blocks) + self.max_num_seqs * -(-decode_len // self.block_size), capture_graphs=False
        )
        peaks = []
        for steps in (
            [
                SequenceStep(
                    [0] * max_prefill_tokens, 0, prefill_blocks, scale=self.rope.scale_for_length(max_prefill_tokens)
                )
            ],
            [SequenceStep([0], 1, table, scale=self.rope.scale_for_length(decode_len)) for table in decode_tables],
        ):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            logits = self.execute(steps).last_logits
            # The sampler's working set: a softmax over every sequence's logits at once.
            torch.softmax(logits.expand(self.max_num_seqs, -1).contiguous(), dim=-1)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
            del logits
        self.kv_cache = None
        torch.cuda.empty_cache()
        return sum(peaks)

    def cuda_graphs_supported(self) -> bool:
        return (
            self.backend.supports_cuda_graphs
            and self.model.supports_cuda_graphs
            and self.rope.scale_table() is not None
        )

    def enable_decode_graphs(self, capture: bool = True) -> None:
        """Route decode steps through ``DecodeCudaGraphs``; without ``capture`` its buffered computation runs
        eagerly (how CPU tests check it)."""
        if not self.cuda_graphs_supported():
            raise ValueError(
                f"decode graphs need a capturable attention backend (not {self.backend.name}), a "
                f"model without host-side routing, and a rope with a finite scale table"
            )
        self.decode_graphs = DecodeCudaGraphs(
            self.model,
            self.backend,
            self.kv_cache,
            self.rope.scale_table(),
            max_batch_size=self.max_num_seqs,
            max_blocks_per_sequence=-(-self.max_model_len // self.block_size),
            dtype=self.dtype,
            log_scale_divisor=float(self._log_base) if self.config.applies_log_scale else None,
        )
        if capture:
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, steps: list[SequenceStep]) -> StepResult:
        if not steps:
            raise ValueError("execute needs at least one sequence")
        if any(step.scale is None for step in steps):
            raise ValueError(
                "every SequenceStep needs its scale (the scheduler's plan, or "
                "rope.scale_for_length(step.rotary_len) for direct use)"
            )
        if any(step.decode_rows for step in steps):
            return self._execute_decode_rows(steps)
        return self._execute(steps)

    def fuses_decode_runs(self, steps: list[SequenceStep]) -> bool:
        """A run of decode steps of ``steps`` goes to the CPU's fused call (``decode_run`` with ``sampling``)."""
        return self.cpu_decode is not None and self.cpu_decode.fits(steps)

    @torch.inference_mode()
    def decode_run(
        self,
        steps: list[SequenceStep],
        count: int,
        pick: Callable[[torch.Tensor], list[int]] | None = None,
        sampling: RunSampling | None = None,
    ) -> list[list[int]]:
        """``count`` decode steps of plain decodes ``steps``, each sequence's picked token the input of its next
        step: every sequence's ``count`` tokens. The block tables hold the run's positions and its steps keep
        each sequence's scale (the scheduler's ``decode_runs``). Where ``fuses_decode_runs``, one call runs
        them, picking by ``sampling`` (None: the argmax); elsewhere they run one by one and ``pick`` (logits
        [B, vocab] float32 -> a token id per row) picks each step's tokens."""
        if count < 1 or not all(step.is_plain_decode and not step.decode_rows for step in steps):
            raise ValueError("a decode run takes plain decode steps and at least one step")
        scales = [step.scale for step in steps]
        if self.fuses_decode_runs(steps):
            self._rerotate(steps, scales)
            return self.cpu_decode.run(steps, scales, self, count, sampling).t().tolist()
        if pick is None:
            raise ValueError("a decode run off the fused path needs ``pick``")
        tokens: list[list[int]] = [[] for _ in steps]
        for _ in range(count):
            chosen = pick(self._execute(steps).last_logits)
            for row, token in enumerate(chosen):
                tokens[row].append(token)
            steps = [
                SequenceStep(
                    [token],
                    step.num_cached + 1,
                    step.block_table,
                    step.scale,
                    scale=step.scale,
                    block_runs=step.block_runs,
                )
                for step, token in zip(steps, chosen)
            ]
        return tokens

    def _rerotate(self, steps: list[SequenceStep], scales: list[int]) -> None:
        """Bring each sequence's cached keys from the scale they carry to the step's (where they differ)."""
        if self.rope.cache_follows_scale:
            rerotate_all(
                self.kv_cache,
                self.rope,
                [
                    Rerotation(step.block_table, step.num_cached, step.cache_scale, scale)
                    for step, scale in zip(steps, scales)
                ],
            )

    def _execute(self, steps: list[SequenceStep], row_groups: list[int] | None = None) -> StepResult:
        scales = [step.scale for step in steps]
        self._rerotate(steps, scales)
        graphs = self.decode_graphs
        if graphs is not None and len(steps) <= graphs.max_batch_size and all(s.is_plain_decode for s in steps):
            return StepResult(self._run_decode_graph(steps, scales), {}, self.model.compute_logits)
        if self.cpu_decode is not None and row_groups is None and self.cpu_decode.fits(steps):
            return StepResult(self.cpu_decode.logits(steps, scales, self), {}, self.model.compute_logits)
        input_ids, meta = self._prepare(steps, scales)
        meta.row_groups = row_groups
        self.backend.prepare(meta)
        hidden = self.model(input_ids, meta)

        last_rows = meta.cu_seqlens_q[1:].long() - 1
        last_logits = self.model.compute_logits(hidden[last_rows]).float()
        all_hidden = {}
        starts = meta.cu_seqlens_q.tolist() if any(step.all_logits for step in steps) else []
        for index, step in enumerate(steps):
            if step.all_logits:
                all_hidden[index] = hidden[starts[index] : starts[index + 1]]
        return StepResult(last_logits, all_hidden, self.model.compute_logits)

    def _execute_decode_rows(self, steps: list[SequenceStep]) -> StepResult:
        """Steps with ``decode_rows`` as one decode per token: a verify chunk of drafts is then the step a
        decode batch is (the CPU's fused decode layers, CUDA graphs) instead of a prompt chunk. All rows'
        keys are written before any row attends, so row j sees the tokens before it; only the first row
        re-rotates the cache, the others find it at their scale already. The rows of one step are told to
        the backend as one group (``AttentionMetadata.row_groups``): the CPU's reads their keys once."""
        rows: list[SequenceStep] = []
        spans = []
        for step in steps:
            first = len(rows)
            if not step.decode_rows:
                rows.append(step)
            for offset, token in enumerate(step.token_ids if step.decode_rows else ()):
                rows.append(
                    SequenceStep(
                        [token],
                        step.num_cached + offset,
                        step.block_table,
                        step.cache_scale if offset == 0 else step.scale,
                        scale=step.scale,
                        block_runs=step.block_runs,
                    )
                )
            spans.append((first, len(rows)))
        result = self._execute(rows, [end - first for first, end in spans])
        logits = result.last_logits  # one row per row: each ran as a sequence of its own
        last_rows = torch.tensor([end - 1 for _, end in spans], device=logits.device)
        return StepResult(
            logits[last_rows],
            {index: result.all_hidden[first] for index, (first, _) in enumerate(spans) if first in result.all_hidden},
            result.compute_logits,
            {index: logits[first:end] for index, (first, end) in enumerate(spans) if steps[index].decode_rows},
        )

    def _run_decode_graph(self, steps: list[SequenceStep], scales: list[int]) -> torch.Tensor:
        for step in steps:
            step.check_blocks(self.block_size)
        positions = [step.num_cached for step in steps]
        slots = [self.kv_cache.slot(step.block_table, step.num_cached) for step in steps]
        logits = self.decode_graphs.run(
            [step.token_ids[0] for step in steps], positions, slots, scales, [step.block_table for step in steps]
        )
        return logits.clone()  # the graph's output buffer is overwritten by the next replay

    def _prepare(self, steps: list[SequenceStep], scales: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        for step in steps:
            step.check_blocks(block_size)
            input_ids.extend(step.token_ids)
            for position in range(step.num_cached, step.total_len):
                positions.append(position)
                slot_mapping.append(self.kv_cache.slot(step.block_table, position))
        query_lens = [len(step.token_ids) for step in steps]
        context_lens = [step.total_len for step in steps]
        block_tables = None
        if self.backend.reads_block_tables:  # others plan from the host tables instead
            max_blocks = max(len(step.block_table) for step in steps)
            block_tables = [step.block_table + [0] * (max_blocks - len(step.block_table)) for step in steps]
        cu_seqlens_q = [0]
        for query_len in query_lens:
            cu_seqlens_q.append(cu_seqlens_q[-1] + query_len)

        device = self.device

        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        positions_t = on_device(positions, torch.long)
        query_lens_t = torch.tensor(query_lens)
        cos, sin = self._rotary_tables(positions_t, scales, query_lens_t)
        meta = AttentionMetadata(
            positions=positions_t,
            slot_mapping=on_device(slot_mapping, torch.long),
            cos=cos,
            sin=sin,
            query_scale=self.query_scale(steps, positions_t, query_lens_t),
            query_lens=query_lens,
            context_lens_host=context_lens,
            context_lens=on_device(context_lens, torch.int32),
            block_tables=on_device(block_tables, torch.int32) if block_tables is not None else None,
            cu_seqlens_q=on_device(cu_seqlens_q, torch.int32),
            block_size=block_size,
            is_decode=all(query_len == 1 for query_len in query_lens),
            block_tables_host=[step.block_table for step in steps],
            block_runs_host=[step.block_runs for step in steps],
            kv_caches=self.kv_cache.layer_views,
            backend=self.backend,
        )
        return on_device(input_ids, torch.long), meta

    def _rotary_tables(
        self, positions: torch.Tensor, scales: list[int], query_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.cos_sin(positions, self.rotary_inv_freq(scales, query_lens))
        return cos.to(self.dtype), sin.to(self.dtype)

    def rotary_inv_freq(self, scales: list[int], query_lens: torch.Tensor) -> torch.Tensor:
        """Every new token's inverse frequencies at its sequence's scale [tokens, rotary_dim / 2], or one row
        [1, rotary_dim / 2] shared by all when the step has one scale."""
        distinct = sorted(set(scales))
        if len(distinct) == 1:
            return self.rope.inv_freq_for_scale(distinct[0])[None, :]
        rows = torch.stack([self.rope.inv_freq_for_scale(scale) for scale in distinct])
        row_of_sequence = torch.tensor([distinct.index(scale) for scale in scales])
        return rows[row_of_sequence.repeat_interleave(query_lens).to(rows.device)]

    def query_scale(
        self, steps: list[SequenceStep], positions: torch.Tensor, query_lens: torch.Tensor
    ) -> torch.Tensor | None:
        """CLEX log_scale: queries of a pass that leaves L tokens are multiplied by log(L) / log(L0)."""
        if not self.config.applies_log_scale:
            return None
        lengths = torch.tensor([step.rotary_len for step in steps], dtype=torch.float32)
        per_token = lengths.repeat_interleave(query_lens)
        if any(step.per_token_scale for step in steps):
            own_length = positions.cpu().float() + 1
            replay = torch.tensor([step.per_token_scale for step in steps]).repeat_interleave(query_lens)
            per_token = torch.where(replay, own_length, per_token)
        return self.log_scale(per_token)[:, None, None]

    def log_scale(self, lengths: torch.Tensor) -> torch.Tensor:
        """CLEX log_scale factors log(L) / log(L0) of float32 ``lengths`` (any shape), in the model's dtype."""
        return (torch.log(lengths) / self._log_base).to(self.device, self.dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole cache blocks (all layers, K and V): copy-on-write before a shared block changes."""
        if copies:
            self.kv_cache.copy_blocks([source for source, _ in copies], [destination for _, destination in copies])

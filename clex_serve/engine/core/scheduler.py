"""Continuous batching: which sequences run in the next step, and with how many tokens each.

First come, first served, with mixed steps (chunked prefill as in Sarathi-Serve and vLLM v1). Every step
first decodes each running sequence that only needs its next token, one token each, preempting the most
recent arrivals (freeing their blocks, to be recomputed later) when blocks run out. What is left of the
token budget ``max_num_batched_tokens`` then goes to prompt and recompute chunks: first the running
sequences part-way through one (they hold their blocks), then new admissions from the waiting queue while
sequences, tokens and KV blocks allow. So a long prompt is computed a chunk per step beside the running
streams instead of stopping them. Plain Python, no tensors.

Decodes are planned before any chunk, so an admission can never take the blocks a decode needs, and a step
that had to preempt admits nothing: the blocks it freed are for the older sequences still running, and
admitting would only hand them to a newcomer that the next shortage preempts again. Decodes are never held
back for the budget, so no running stream stalls, and they cannot outgrow it: a sequence becomes a decode
only after a chunk that fitted in what the decodes left. When they take all of it, prompt work waits and
nothing is admitted, so the running set only shrinks until a decode finishes (within ``max_model_len``
tokens) or is preempted; the budget it frees goes to the oldest prompt work first. So every waiting request
gets its turn, and no step exceeds the budget.

Recomputing a preempted sequence must give back exactly the cache it had, and under CLEX that cache
depends on how it was built: the prompt in one pass at the prompt's scale, then each generated token at
the scale of the length it was decoded at. So a recompute replays those scales: the prompt pass, then one
chunk per run of generated tokens that were decoded at the same scale (each query with its own length for
log_scale), which equals decoding them one by one.

The scheduler is the one owner of each step's plan: which sequences run, the scale each chunk rotates with,
and, when that scale differs from the one a sequence's cached keys carry, the copy-on-write block copies
its re-rotation needs. Those blocks are taken when the chunk is planned, before the next sequence is
considered, so what was counted is what is reserved. The worker only executes the plan; what it returns
comes back through ``update_from_output``, the one place where the step's results enter the scheduler's
state (cached tokens, the scale the cache carries, prefix blocks, sampled tokens and the stops they make).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from clex_serve.engine.core.block_manager import BlockManager
from clex_serve.engine.core.decode_runs import plan_decode_run
from clex_serve.engine.core.sequence import Sequence, SequenceStatus
from clex_serve.engine.core.step_plan import ScheduledChunk, SchedulerOutput
from clex_serve.engine.core.verify_planning import add_drafts, take_verify_result
from clex_serve.text.stop_checker import token_stop

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # longer prompts are computed in chunks of this size
    # Prompt tokens a step may carry beside decodes (None: the budget's rest). What a prompt chunk adds to
    # a step is what every running stream waits for that token, so this bounds their inter-token latency;
    # a step with nothing to decode still takes the full budget, so a prompt alone is not slowed.
    max_prefill_tokens_with_decodes: int | None = None

    # Short prompts beside decodes go whole, from a budget of this many times the cap (vLLM's
    # long-prefill threshold, in spirit): the cap is there for long prompts, whose late chunks attend their
    # whole cached prefix; a chat turn of a few dozen tokens held to the cap would wait several steps
    # behind every other arrival for its first token. "Short" is the whole sequence, not what is left of it.
    # Eight times: with the CPU cap of 12, a step then carries two or three 34-token chat prompts beside 16
    # decodes and takes about twice a decode step (inside the 3x inter-token bound the cap is chosen for);
    # 16 chat requests arriving together got their first token at p50 158-213 ms instead of 253-287 ms
    # with four times, at equal or higher output tokens/s.
    SHORT_PROMPT_FACTOR = 8

    @property
    def short_prompt_tokens_with_decodes(self) -> int:
        """Tokens per step, beside decodes, for prompts (or recomputes) that finish within them."""
        if self.max_prefill_tokens_with_decodes is None:
            return 0
        return self.SHORT_PROMPT_FACTOR * self.max_prefill_tokens_with_decodes

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_prefill_tokens_with_decodes is not None and self.max_prefill_tokens_with_decodes < 1:
            raise ValueError(
                f"max_prefill_tokens_with_decodes must be at least 1, got {self.max_prefill_tokens_with_decodes}"
            )


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        scale_for_length: Callable[[int], int],
        prefix_key: Callable[[Sequence], Hashable | None] = lambda seq: None,
        cache_follows_scale: bool = True,
        eos_token_ids: list[int] = (),
        max_model_len: int | None = None,
        drafter=None,
        max_run_steps: int = 1,
    ) -> None:
        """``cache_follows_scale``: cached keys are re-rotated when their sequence's scale changes (CLEX);
        False where keys keep the rotation they were written with (dynamic NTK, as in transformers).
        ``eos_token_ids`` and ``max_model_len`` end sequences as their tokens arrive. ``drafter``
        (``spec_decode.drafter.Drafter``): decodes carry drafted tokens to verify; None: no speculation.
        ``max_run_steps``: the most steps a plan of decodes runs in one go (``decode_runs``)."""
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.scale_for_length = scale_for_length
        self.cache_follows_scale = cache_follows_scale
        self.prefix_key = prefix_key
        self.drafter = drafter
        self.max_run_steps = max_run_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if self.drafter is not None:
            self.drafter.release(seq)
        seq.status = SequenceStatus.FINISHED

    def update_from_output(self, plan: SchedulerOutput, sampled: dict[int, list]) -> list[tuple[Sequence, list]]:
        """Take a step's results into the sequences: what is now cached and at which scale, the prompt
        blocks a finished prompt pass publishes to the prefix cache, and the tokens sampled (``seq_id ->``
        objects with a ``token_id``), each checked for the stops a token makes (EOS, stop token ids,
        max_tokens, the model's length). Returns (sequence, its new tokens) in the plan's order; a sequence
        that finished has ``finish_reason`` set (the caller frees it, once its output is built)."""
        advanced = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_cached_tokens = chunk.end
            seq.cache_scale = chunk.scale
            if chunk.is_prompt_pass and chunk.end == seq.num_prompt_tokens and seq.num_output_tokens == 0:
                self.block_manager.register_prompt_blocks(seq, self.prefix_key(seq))
            tokens = sampled.get(seq.seq_id)
            if not tokens:
                continue
            if chunk.draft_token_ids:
                take_verify_result(chunk, len(tokens), self.drafter, self.block_manager)
            accepted = []
            for token in tokens:
                seq.token_ids.append(token.token_id)
                accepted.append(token)
                stop = token_stop(
                    seq.params,
                    token.token_id,
                    seq.num_output_tokens,
                    len(seq),
                    self.eos_token_ids,
                    self.max_model_len or len(seq) + 1,
                )
                if seq.grammar is not None and seq.grammar.accept(token.token_id) and stop is None:
                    stop = ("stop", None)  # the structured output is complete
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = stop
                    break
            advanced.append((seq, accepted))
        return advanced

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> SchedulerOutput:
        copies: list[tuple[int, int]] = []
        decodes, preempted = self._schedule_decodes(copies)
        if self.drafter is not None and not preempted:  # a step short of blocks drafts nothing
            room = self.config.max_num_batched_tokens - len(decodes)
            add_drafts(decodes, self.drafter, self.block_manager, self.scale_for_length, room, self.max_model_len)
        budget = self.config.max_num_batched_tokens - sum(chunk.num_tokens for chunk in decodes)
        short_budget = 0
        if decodes and self.config.max_prefill_tokens_with_decodes is not None:
            short_budget = min(budget, self.config.short_prompt_tokens_with_decodes)
            budget = min(budget, self.config.max_prefill_tokens_with_decodes)
        prefills = self._schedule_prefills(budget, not preempted, copies, short_budget)
        run_steps = 1
        if not prefills and not preempted and self.drafter is None:
            run_steps = plan_decode_run(
                decodes, self.block_manager, self.scale_for_length, self.max_run_steps, self.max_model_len
            )
        return SchedulerOutput(decodes, prefills, preempted, copies, run_steps)

    def _needs_rescale(self, seq: Sequence, scale: int) -> bool:
        return self.cache_follows_scale and seq.num_cached_tokens > 0 and scale != seq.cache_scale

    def _blocks_to_rescale(self, seq: Sequence, scale: int) -> int:
        """Free blocks a chunk of ``seq`` at ``scale`` takes for copy on write before re-rotating."""
        if not self._needs_rescale(seq, scale):
            return 0
        return self.block_manager.free_blocks_needed_for_rescale(seq)

    def _plan(self, chunk: ScheduledChunk, copies: list[tuple[int, int]]) -> ScheduledChunk:
        """Fix the chunk's scale; when the cached keys must follow it, reserve and record their block copies
        now (the caller has checked that the free blocks suffice)."""
        seq = chunk.seq
        chunk.scale = self.scale_for_length(chunk.scale_len or chunk.end)
        if self._needs_rescale(seq, chunk.scale):
            chunk.rescale_from = seq.cache_scale
            copies.extend(self.block_manager.prepare_rescale(seq))
        return chunk

    @staticmethod
    def needs_prefill(seq: Sequence) -> bool:
        """Part of the prompt, or more than the last sampled token, is not in the cache yet."""
        return seq.num_cached_tokens < seq.num_prompt_tokens or seq.num_uncomputed_tokens > 1

    def _next_chunk(self, seq: Sequence, budget: int) -> ScheduledChunk:
        """The next piece of ``seq`` to compute, at most ``budget`` tokens (at least one).

        Prompt chunks all rotate with the full prompt's scale, so a chunked prompt equals one pass.
        """
        cached, prompt_len = seq.num_cached_tokens, seq.num_prompt_tokens
        limit = cached + max(budget, 1)
        if cached < prompt_len:
            return ScheduledChunk(seq, cached, min(prompt_len, limit), prompt_len, False, True)
        scale = self.scale_for_length(cached + 1)
        end = cached + 1
        while end < min(len(seq), limit) and self.scale_for_length(end + 1) == scale:
            end += 1
        return ScheduledChunk(seq, cached, end, None, True, False)

    def _schedule_decodes(self, copies: list[tuple[int, int]]) -> tuple[list[ScheduledChunk], list[Sequence]]:
        """One token for every running sequence that needs only its next one, in arrival order. When blocks
        run out the most recent arrival is preempted, whether it decodes or is part-way through a prompt: it
        comes later in the queue, so nothing already planned is undone. With no later arrival left, the
        sequence preempts itself."""
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if self.needs_prefill(seq):
                continue  # its chunk comes from the budget the decodes leave
            while not self._can_decode(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq, len(seq))
                chunks.append(self._plan(ScheduledChunk(seq, len(seq) - 1, len(seq), None, False, False), copies))
        return chunks, preempted

    def _schedule_prefills(
        self, budget: int, admit: bool, copies: list[tuple[int, int]], short_budget: int = 0
    ) -> list[ScheduledChunk]:
        """Prompt and recompute chunks within ``budget`` tokens; new sequences only where ``admit``. A
        sequence short enough to fit in ``short_budget`` whole takes what is left of it from there instead; the
        two together never exceed the larger of them (which the caller bounds by the step's budget)."""
        chunks = []
        left = {"chunk": budget, "short": short_budget, "step": max(budget, short_budget)}

        def source(seq: Sequence) -> str | None:
            """Which budget the sequence's next chunk comes from, or None when neither has room. Only a
            sequence short as a whole is short: the last chunk of a long prompt attends its whole prefix,
            the most expensive chunk of all."""
            if len(seq) <= min(left["short"], left["step"]) and seq.num_cached_tokens < len(seq):
                return "short"
            return "chunk" if min(left["chunk"], left["step"]) > 0 else None

        def next_chunk(seq: Sequence, name: str) -> ScheduledChunk:
            size = len(seq) - seq.num_cached_tokens if name == "short" else min(left["chunk"], left["step"])
            return self._next_chunk(seq, size)

        def take(chunk: ScheduledChunk, name: str) -> ScheduledChunk:
            left[name] -= chunk.num_tokens
            left["step"] -= chunk.num_tokens
            return chunk

        # Sequences part-way through a chunked prompt or a recompute go first: they hold their blocks.
        for seq in self.running:
            if not self.needs_prefill(seq):
                continue
            name = source(seq)
            if name is None:
                continue
            chunk = next_chunk(seq, name)
            scale = self.scale_for_length(chunk.scale_len or chunk.end)
            if self._blocks_to_rescale(seq, scale) > self.block_manager.num_free_blocks:
                continue  # its copy on write must wait for blocks; it keeps the ones it holds
            chunks.append(self._plan(take(chunk, name), copies))
        while admit and self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            name = source(seq)
            if name is None:
                break
            key = self.prefix_key(seq) if seq.num_output_tokens == 0 else None
            if not self.block_manager.can_allocate(seq, key):
                break
            self.block_manager.allocate(seq, key)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            # Reused prefix blocks may have shortened what is left: the source is decided again.
            name = source(seq) or name
            chunks.append(self._plan(take(next_chunk(seq, name), name), copies))  # nothing cached to re-rotate
        return chunks

    def _can_decode(self, seq: Sequence) -> bool:
        """Free blocks for the new token's slot and, if its scale changes, for unsharing its blocks."""
        needed = self.block_manager.blocks_for(len(seq)) - len(seq.block_table)
        needed += self._blocks_to_rescale(seq, self.scale_for_length(len(seq)))
        return needed <= self.block_manager.num_free_blocks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

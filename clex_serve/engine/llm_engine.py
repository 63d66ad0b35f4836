"""The synchronous engine: requests in, one scheduled forward step at a time, outputs out.

``step()`` runs one batch chosen by the scheduler and returns the outputs of the requests it advanced.
The offline ``LLM`` loops over it; the asyncio engine drives it from a background thread. Requests are
checked completely before admission (``input_processor``); outputs are built by ``output_processor``.
"""

from __future__ import annotations

import itertools
import time

import torch

from clex_serve.engine.core.block_manager import BlockManager, PrefixKey
from clex_serve.engine.core.request import Request
from clex_serve.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.engine_config import (
    EngineConfig,
    default_decode_run_steps,
    default_prefill_tokens_with_decodes,
    num_kv_blocks,
)
from clex_serve.engine.errors import QueueFullError
from clex_serve.engine.input_processor import InputProcessor, ProcessedPrompt
from clex_serve.engine.output_processor import OutputProcessor
from clex_serve.engine.outputs import RequestMetrics, RequestOutput
from clex_serve.engine.spec_decode.drafter import Drafter, observe_verify_step, spec_decode_counters
from clex_serve.engine.stats import EngineStats
from clex_serve.engine.structured.compiler import GrammarCompiler
from clex_serve.engine.structured.grammar import SequenceGrammar
from clex_serve.engine.worker.host_memory import keep_freed_host_memory
from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.engine.worker.sampler import Sampler
from clex_serve.engine.worker.worker import Worker
from clex_serve.loading.loader import load_model
from clex_serve.loading.model_source import resolve_model_path
from clex_serve.loading.tokenizer_fit import check_tokenizer_fits
from clex_serve.sampling_params import SamplingParams
from clex_serve.text.detokenizer import IncrementalDetokenizer
from clex_serve.text.tokenizer import eos_token_ids, load_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine_config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)  # once, before any work: it is process-wide
        overrides = {} if config.log_scale is None else {"log_scale": config.log_scale}
        model_path = resolve_model_path(config.resolved_model(), config.revision)
        # The tokenizer first: it is cheap, and a missing one should not cost a model load to discover.
        self.tokenizer = load_tokenizer(config.tokenizer or model_path)
        loaded = load_model(
            model_path,
            dtype=config.dtype,
            device=config.device,
            show_progress=config.show_progress,
            config_overrides=overrides,
            load_format=config.load_format,
            seed=config.seed,
        )
        self.model_config = loaded.config
        self.model_path = loaded.path
        check_tokenizer_fits(self.tokenizer, self.model_config.vocab_size, str(config.tokenizer or model_path))
        self.device = loaded.device
        if self.device.type == "cpu":
            keep_freed_host_memory()  # before the engine's thread exists: see host_memory
        self.eos_token_ids = eos_token_ids(loaded.path, self.model_config, self.tokenizer)
        self.max_model_len = config.resolved_max_model_len(self.model_config)

        # One runner: it chooses the backend and block size, measures a step's memory on CUDA (before the
        # pool exists), then gets the pool sized from what is left.
        runner = ModelRunner(
            loaded,
            None,
            config.block_size,
            config.attention_backend,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            enforce_eager=config.enforce_eager,
        )
        block_size = runner.block_size
        max_num_batched_tokens = config.max_num_batched_tokens or max(self.max_model_len, 2048)
        activation_bytes = 0
        if loaded.device.type == "cuda" and config.kv_cache_memory_gib is None:
            activation_bytes = runner.profile_peak_memory(min(max_num_batched_tokens, self.max_model_len))
        num_blocks = num_kv_blocks(
            config, self.model_config, block_size, loaded.dtype, loaded.device, self.max_model_len, activation_bytes
        )
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens, less than one sequence of "
                f"max_model_len {self.max_model_len}; give the cache more memory or lower max_model_len"
            )
        runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(
            num_blocks, block_size, config.enable_prefix_caching, layout=runner.cache_layout
        )
        rope = runner.rope
        spec = config.speculative_config
        self.drafter = Drafter(spec) if spec is not None else None
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                max_num_batched_tokens,
                config.max_prefill_tokens_with_decodes or default_prefill_tokens_with_decodes(loaded.device.type),
            ),
            self.block_manager,
            rope.scale_for_length,
            self._prefix_key,
            rope.cache_follows_scale,
            self.eos_token_ids,
            self.max_model_len,
            drafter=self.drafter,
            max_run_steps=config.decode_run_steps or default_decode_run_steps(runner.cpu_decode is not None),
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len, self.grammars)
        self.outputs = OutputProcessor()
        self.worker = Worker(
            runner, Sampler(self.model_config.vocab_size, self.device, config.seed), self.eos_token_ids
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._step_request_ids: list[str] = []  # the requests of the step in progress

    # ------------------------------------------------------------------ requests

    def _prefix_key(self, seq: Sequence):
        """What a cached prefix block must have been computed with to be reused for ``seq``'s prompt."""
        if seq.params.prompt_logprobs is not None:
            return None  # prompt logprobs need every prompt position's logits
        length = seq.num_prompt_tokens
        scale = self.scheduler.scale_for_length(length)
        return PrefixKey(scale, length if self.model_config.applies_log_scale else None)

    def tokenize(self, prompt: str) -> list[int]:
        return self.inputs.tokenize(prompt)

    def process_inputs(self, prompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and check a request; reads no engine state, so any thread may call it."""
        return self.inputs.process(prompt, params)

    def add_request(
        self, prompt: str | list[int] | dict, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        return self.add_processed_request(self.process_inputs(prompt, params), request_id)

    def add_processed_request(
        self, processed: ProcessedPrompt, request_id: str | None = None, arrival_time: float | None = None
    ) -> str:
        request_id = f"req-{next(self._request_ids)}" if request_id is None else request_id
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.engine_config.max_queued_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise QueueFullError(
                f"{len(self.scheduler.waiting)} requests are already waiting (the limit is {limit}); try again later"
            )
        params, token_ids = processed.params, processed.token_ids
        seqs, detokenizers = [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), params)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            if processed.grammar is not None:
                seq.grammar = SequenceGrammar(processed.grammar)
            seqs.append(seq)
            detokenizers.append(IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens))
        metrics = RequestMetrics(
            arrival_time=time.monotonic() if arrival_time is None else arrival_time, num_prompt_tokens=len(token_ids)
        )
        self.requests[request_id] = Request(
            request_id, processed.text, list(token_ids), params, seqs, detokenizers, metrics
        )
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request; returns its final output (``finish_reason="abort"`` where unfinished), or None
        for an unknown id."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = seq.finish_reason or "abort"
                self._finish(seq)
        return self.outputs.make_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_unfinished_requests=len(self.requests),
            num_kv_blocks=manager.num_blocks,
            num_free_kv_blocks=manager.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_blocks=manager.prefix_hit_blocks,
            prefix_cache_hit_tokens=manager.prefix_hits,
            prefix_cache_queried_tokens=manager.prefix_queried_tokens,
            **(spec_decode_counters(self.drafter) if self.drafter is not None else {}),
        )

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.worker.release(seq)

    def scale_for_length(self, num_tokens: int) -> int:
        """The CLEX scale ``t`` a sequence of ``num_tokens`` tokens runs at (1 for plain RoPE models)."""
        return self.scheduler.scale_for_length(max(1, num_tokens))

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """One step: the scheduler plans it, the worker runs it, the scheduler takes in what it returned, and
        the requests it advanced get their outputs."""
        if not self.scheduler.has_work():
            return []
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        self._start_step(plan)
        started = time.perf_counter()
        result = self.worker.execute(plan)
        if self.drafter is not None:
            observe_verify_step(self.drafter, plan, time.perf_counter() - started)
        advanced = self.scheduler.update_from_output(plan, result.sampled)
        for chunk in plan.chunks:
            if chunk.seq.seq_id in result.prompt_logprobs:
                self.outputs.add_prompt_logprobs(
                    self.requests[chunk.seq.request_id], chunk.start, result.prompt_logprobs[chunk.seq.seq_id]
                )
        now = time.monotonic()
        for seq, tokens in advanced:
            self.outputs.append_tokens(self.requests[seq.request_id], seq, tokens, now)
        self._step_request_ids = []
        return self._outputs_of(seq for seq, _ in advanced)

    def _start_step(self, plan: SchedulerOutput) -> None:
        """Remember the step's requests (to end them if it raises) and when each was first scheduled."""
        now = time.monotonic()
        self._step_request_ids = list(dict.fromkeys(chunk.seq.request_id for chunk in plan.chunks))
        for request_id in self._step_request_ids:
            metrics = self.requests[request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now

    def _outputs_of(self, seqs) -> list[RequestOutput]:
        """Free the sequences that finished, then build each advanced request's output (once per request);
        a finished request leaves the engine."""
        touched: dict[str, Request] = {}
        for seq in seqs:
            if seq.finish_reason is not None:
                self._finish(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in touched.values():
            output = self.outputs.make_output(request)
            if output is not None:
                outputs.append(output)
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def abort_step_requests(self) -> list[RequestOutput]:
        """After a step raised: end the requests it was running (their state may be half-updated), so that
        the engine can go on with the others. Returns their final outputs."""
        request_ids, self._step_request_ids = self._step_request_ids, []
        return [output for output in map(self.abort_request, request_ids) if output is not None]

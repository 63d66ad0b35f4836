"""The synchronous engine: requests in, one scheduled forward step at a time, outputs out.

``step()`` runs one batch chosen by the scheduler and returns the outputs of the requests it advanced.
The offline ``LLM`` loops over it; the asyncio engine drives it from a background thread.
"""

from __future__ import annotations

import itertools
import time

import torch

from clex_serve.engine.block_manager import BlockManager, PrefixKey
from clex_serve.text.detokenizer import IncrementalDetokenizer
from clex_serve.engine.engine_config import EngineConfig, num_kv_blocks
from clex_serve.loading.loader import load_model
from clex_serve.engine.memory_profile import peak_step_memory
from clex_serve.loading.model_source import resolve_model_path
from clex_serve.engine.model_runner import ModelRunner, SequenceStep
from clex_serve.engine.outputs import RequestOutput
from clex_serve.engine.request import Request
from clex_serve.engine.sampler import sample, token_logprobs
from clex_serve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from clex_serve.engine.sequence import Sequence
from clex_serve.text.stop_checker import check_stop_strings, check_stop_tokens
from clex_serve.text.tokenizer import eos_token_ids, load_tokenizer
from clex_serve.sampling_params import SamplingParams


# Rows of prompt logits materialised at once when computing prompt logprobs.
_PROMPT_LOGPROB_ROWS = 256


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine_config = config
        overrides = {} if config.log_scale is None else {"log_scale": config.log_scale}
        model_path = resolve_model_path(config.resolved_model(), config.revision)
        # The tokenizer first: it is cheap, and a missing one should not cost a model load to discover.
        self.tokenizer = load_tokenizer(config.tokenizer or model_path)
        loaded = load_model(model_path, dtype=config.dtype, device=config.device,
                            show_progress=config.show_progress, config_overrides=overrides,
                            load_format=config.load_format, seed=config.seed)
        self.model_config = loaded.config
        self.model_path = loaded.path
        self.device = loaded.device
        self.eos_token_ids = eos_token_ids(loaded.path, self.model_config, self.tokenizer)
        self.max_model_len = config.resolved_max_model_len(self.model_config)

        block_size = config.block_size or ModelRunner.default_block_size(loaded, config.attention_backend)
        max_num_batched_tokens = config.max_num_batched_tokens or max(self.max_model_len, 2048)
        activation_bytes = 0
        if loaded.device.type == "cuda" and config.kv_cache_memory_gib is None:
            activation_bytes = peak_step_memory(loaded, block_size, config.attention_backend,
                                                min(max_num_batched_tokens, self.max_model_len), config.max_num_seqs)
        num_blocks = num_kv_blocks(config, self.model_config, block_size, loaded.dtype, loaded.device,
                                   self.max_model_len, activation_bytes)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens, less than one sequence of "
                f"--max-model-len {self.max_model_len}; raise --kv-cache-memory or lower --max-model-len"
            )
        self.runner = ModelRunner(loaded, num_blocks, block_size, config.attention_backend,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  enforce_eager=config.enforce_eager)
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        rope = self.runner.rope
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max_num_batched_tokens),
            self.block_manager, rope.scale_for_length, self._prefix_key, rope.cache_follows_scale,
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()

    # ------------------------------------------------------------------ requests

    def _prefix_key(self, seq: Sequence):
        """What a cached prefix block must have been computed with to be reused for ``seq``'s prompt."""
        if seq.params.prompt_logprobs is not None:
            return None  # prompt logprobs need every prompt position's logits
        length = seq.num_prompt_tokens
        scale = self.runner.rope.scale_for_length(length)
        return PrefixKey(scale, length if self.model_config.applies_log_scale else None)

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        text, token_ids = self._prompt_tokens(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model reads at most {self.max_model_len} "
                f"(prompt and output together); shorten it or raise --max-model-len"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs, detokenizers = [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), params)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            seqs.append(seq)
            detokenizers.append(IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens))
        self.requests[request_id] = Request(request_id, text, list(token_ids), params, seqs, detokenizers)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _prompt_tokens(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt]
        raise ValueError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.finish(seq)
        return request.to_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        if not self.scheduler.has_work():
            return []
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        self.runner.copy_blocks(batch.block_copies)
        result = self.runner.execute([self._sequence_step(chunk) for chunk in batch.chunks])

        sampling_rows, sampling_seqs = [], []
        for row, chunk in enumerate(batch.chunks):
            seq = chunk.seq
            seq.num_cached_tokens = chunk.end
            seq.cache_scale = chunk.scale
            if row in result.all_hidden:
                self._add_prompt_logprobs(seq, chunk.start, result.all_hidden[row], result.compute_logits)
            if chunk.is_prompt_pass and chunk.end == seq.num_prompt_tokens and seq.num_output_tokens == 0:
                self.block_manager.register_prompt_blocks(seq, self._prefix_key(seq))
            if chunk.samples:
                sampling_rows.append(row)
                sampling_seqs.append(seq)

        touched: dict[str, Request] = {}
        if sampling_seqs:
            logits = result.last_logits[sampling_rows]
            for seq, sampled in zip(sampling_seqs, sample(logits, sampling_seqs, self.eos_token_ids)):
                self._append_token(seq, sampled.token_id, sampled.logprobs)
                touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in touched.values():
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            outputs.append(request.to_output())
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _sequence_step(self, chunk: ScheduledChunk) -> SequenceStep:
        """The runner's view of a planned chunk."""
        seq = chunk.seq
        want_prompt_logits = (chunk.is_prompt_pass and seq.params.prompt_logprobs is not None
                              and seq.index == 0 and seq.num_output_tokens == 0)
        return SequenceStep(
            token_ids=seq.token_ids[chunk.start:chunk.end],
            num_cached=seq.num_cached_tokens,
            block_table=seq.block_table,
            cache_scale=chunk.rescale_from or chunk.scale,
            scale=chunk.scale,
            all_logits=want_prompt_logits,
            scale_len=chunk.scale_len,
            per_token_scale=chunk.per_token_scale,
        )

    def _add_prompt_logprobs(self, seq: Sequence, start: int, hidden: torch.Tensor, compute_logits) -> None:
        """Logprob of each prompt token given the tokens before it, for a prompt chunk starting at ``start``;
        in row pieces so that a long prompt never materialises [tokens, vocab] logits at once."""
        request = self.requests[seq.request_id]
        if start == 0:
            request.prompt_logprobs = [None]  # the first prompt token has no context
        rows = min(hidden.shape[0], seq.num_prompt_tokens - 1 - start)  # the last prompt row predicts output
        for offset in range(0, rows, _PROMPT_LOGPROB_ROWS):
            end = min(offset + _PROMPT_LOGPROB_ROWS, rows)
            logprobs = torch.log_softmax(compute_logits(hidden[offset:end]).float(), dim=-1).cpu()
            for row in range(end - offset):
                target = seq.token_ids[start + offset + row + 1]
                request.prompt_logprobs.append(token_logprobs(logprobs[row], target, seq.params.prompt_logprobs))

    def _append_token(self, seq: Sequence, token_id: int, logprobs) -> None:
        request = self.requests[seq.request_id]
        seq.token_ids.append(token_id)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        check_stop_tokens(seq, token_id, self.eos_token_ids, self.max_model_len)
        new_text = request.detokenizers[seq.index].add(token_id)
        seq.output_text += new_text
        if new_text:
            check_stop_strings(seq, len(new_text))
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

"""The offline API, in vLLM's shape: ``LLM(model=...).generate(prompts, sampling_params)`` and ``.chat``."""

from __future__ import annotations

import dataclasses
import itertools

from tqdm import tqdm

from clex_serve.engine.engine_config import EngineConfig
from clex_serve.engine.llm_engine import LLMEngine
from clex_serve.engine.outputs import RequestOutput
from clex_serve.sampling_params import RequestOutputKind, SamplingParams
from clex_serve.text.chat_template import chat_prompt, render_chat


class LLM:
    """Load a model once; generate for many prompts at once with continuous batching.

    ``LLM()`` with no model loads the embedded demo model. Keyword arguments are ``EngineConfig`` fields
    (``dtype``, ``device``, ``max_model_len``, ``kv_cache_memory_gib``, ``enable_prefix_caching``, ...).
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        if not isinstance(prompts, (list, tuple)):  # one prompt (a string, a dict): a list of prompts otherwise
            prompts = [prompts]
        if not isinstance(sampling_params, (list, tuple)):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        # Every prompt is checked before any is admitted; the offline API returns whole outputs at the end.
        processed = [self.engine.process_inputs(prompt, params) for prompt, params in zip(prompts, sampling_params)]
        request_ids = []
        for item in processed:
            item.params = dataclasses.replace(item.params, output_kind=RequestOutputKind.FINAL_ONLY)
            request_ids.append(self.engine.add_processed_request(item, f"offline-{next(self._ids)}"))
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        family = self.engine.model_config.family
        prompts = [
            chat_prompt(self.engine.tokenizer, conversation, family, add_generation_prompt)
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.engine.tokenizer, messages, self.engine.model_config.family, add_generation_prompt)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as progress:
            while len(finished) < len(request_ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine stopped with requests unfinished")  # never loop forever
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        return [finished[request_id] for request_id in request_ids]

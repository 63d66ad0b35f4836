"""Answers from an ``AsyncLLMEngine`` in this process: the API server's own (the web demo at /ui) or one the
terminal chat starts for itself."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from clex_serve.chat.source import ChatSource, ChatSourceError
from clex_serve.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from clex_serve.engine.async_engine import AsyncLLMEngine


class EngineSource(ChatSource):
    """``chat_template``: None for the tokenizer's own, else the model family's. ``owns_engine``: ``close()``
    shuts the engine down (the terminal chat's own; a server's engine is the server's to stop)."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        chat_template: str | None,
        model_name: str | None = None,
        owns_engine: bool = False,
    ) -> None:
        self.engine = engine
        self.chat_template = chat_template
        self.model_name = model_name or str(engine.model_path)
        self.max_model_len = engine.max_model_len
        self.owns_engine = owns_engine

    def _prompt(self, messages: list[dict]) -> dict:
        from clex_serve.text.chat_template import chat_prompt

        return chat_prompt(self.engine.tokenizer, messages, self.engine.model_config.family, True, self.chat_template)

    async def count_tokens(self, messages: list[dict]) -> int:
        return len((await asyncio.to_thread(self._prompt, messages))["prompt_token_ids"])

    def scale_for(self, num_tokens: int) -> int:
        return self.engine.scale_for_length(num_tokens)

    def is_idle(self) -> bool:
        return self.engine.stats().num_unfinished_requests == 0

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str]:
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        try:
            prompt = await asyncio.to_thread(self._prompt, messages)
            generator = self.engine.generate(prompt, params)
            try:
                async for output in generator:
                    if output.outputs[0].text:
                        yield output.outputs[0].text
            finally:
                await generator.aclose()  # before the end (Stop, Ctrl-C): the engine aborts the request
        except Exception as error:  # a bad conversation, a full queue, a stopped engine: one line for the user
            raise ChatSourceError(str(error)) from error

    async def close(self) -> None:
        if self.owns_engine:
            await asyncio.to_thread(self.engine.shutdown)

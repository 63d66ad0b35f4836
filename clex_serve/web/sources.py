"""Where the web demo's answers come from: the engine of the server it is mounted on, or an OpenAI-compatible
server. Both stream text deltas; closing the stream (the Stop button cancels it) frees the request's work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from clex_serve.sampling_params import RequestOutputKind, SamplingParams


class EngineSource:
    """In process, on the API server's own engine and chat template."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.max_model_len = ctx.max_model_len
        self.model_name = ctx.served_model_name

    def _prompt(self, messages: list[dict]) -> dict:
        from clex_serve.text.chat_template import chat_prompt, fallback_template

        template = self.ctx.chat_template or fallback_template(self.ctx.family)
        return chat_prompt(self.ctx.tokenizer, messages, self.ctx.family, True, template)

    async def count_tokens(self, messages: list[dict]) -> int | None:
        return len((await asyncio.to_thread(self._prompt, messages))["prompt_token_ids"])

    def scale_for(self, num_tokens: int) -> int | None:
        return self.ctx.engine.scale_for_length(num_tokens)

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str]:
        import dataclasses

        prompt = await asyncio.to_thread(self._prompt, messages)
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        generator = self.ctx.engine.generate(prompt, params)
        try:
            async for output in generator:
                if output.outputs[0].text:
                    yield output.outputs[0].text
        finally:
            await generator.aclose()  # on Stop: the engine aborts the request and frees its blocks


class OpenAISource:
    """A client of an OpenAI-compatible server (clex-serve's /tokenize counts tokens when it is there)."""

    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        import openai

        self.url = url.rstrip("/")
        self.api_key = api_key
        self.client = openai.AsyncOpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=600)
        sync = openai.OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=30)
        models = sync.models.list().data
        card = next((m for m in models if m.id == model), models[0]) if models else None
        if card is None:
            raise ValueError(f"{self.url} serves no model")
        self.model_name = card.id
        self.max_model_len = (card.model_extra or {}).get("max_model_len")

    async def count_tokens(self, messages: list[dict]) -> int | None:
        import httpx

        base = self.url[:-3] if self.url.endswith("/v1") else self.url
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(f"{base}/tokenize", json={"model": self.model_name, "messages": messages},
                                           headers=headers)
            return response.json()["count"] if response.status_code == 200 else None
        except (httpx.HTTPError, KeyError, ValueError):
            return None

    def scale_for(self, num_tokens: int) -> int | None:
        return None

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str]:
        response = await self.client.chat.completions.create(
            model=self.model_name, messages=messages, stream=True, temperature=params.temperature,
            top_p=params.top_p, max_tokens=params.max_tokens,
            extra_body={"top_k": params.top_k, "repetition_penalty": params.repetition_penalty})
        try:
            async for chunk in response:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
        finally:
            await response.close()  # on Stop: the server sees the disconnect and aborts the request

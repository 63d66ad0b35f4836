"""Answers from any OpenAI-compatible server; clex-serve's (and vLLM's) /tokenize counts the tokens where the
server has one."""

from __future__ import annotations

from collections.abc import AsyncIterator

from clex_serve.chat.source import ChatSource, ChatSourceError
from clex_serve.sampling_params import SamplingParams


class OpenAISource(ChatSource):
    """``model``: the served model to use (default: the server's first). The constructor asks the server for
    its models, blocking: build the source before an event loop runs it."""

    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        import openai

        self.url = url.rstrip("/")
        self.api_key = api_key
        with openai.OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=30) as client:
            try:
                models = client.models.list().data
            except openai.AuthenticationError:
                raise ChatSourceError(self._refused_key()) from None
            except openai.APIConnectionError:
                raise ChatSourceError(self._unreachable()) from None
            except openai.APIError as error:
                raise ChatSourceError(f"{self.url}: {error.message}") from None
        if not models:
            raise ChatSourceError(f"{self.url} serves no model")
        self.model_name = model or models[0].id
        card = next((m for m in models if m.id == self.model_name), models[0])
        self.max_model_len = getattr(card, "max_model_len", None) or (card.model_extra or {}).get("max_model_len")
        self.client = openai.AsyncOpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=600)

    def _refused_key(self) -> str:
        return f"{self.url} refused the API key: pass the right one with --api-key"

    def _unreachable(self) -> str:
        return f"cannot reach a server at {self.url}: is it running?"

    async def count_tokens(self, messages: list[dict]) -> int | None:
        """Through the server's /tokenize when it has one; None otherwise."""
        import httpx

        base = self.url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(
                    f"{base}/tokenize", json={"model": self.model_name, "messages": messages}, headers=headers
                )
            return response.json()["count"] if response.status_code == 200 else None
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return None

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str]:
        import openai

        try:
            response = await self.client.chat.completions.create(
                model=self.model_name,
                messages=messages,
                stream=True,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                seed=params.seed,
                extra_body={"top_k": params.top_k, "repetition_penalty": params.repetition_penalty},
            )
        except openai.AuthenticationError:
            raise ChatSourceError(self._refused_key()) from None
        except openai.APIConnectionError:
            raise ChatSourceError(self._unreachable()) from None
        except openai.APIStatusError as error:
            body = error.body if isinstance(error.body, dict) else {}
            raise ChatSourceError(f"the server refused the request: {body.get('message', error.message)}") from None
        try:
            async for chunk in response:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
        except openai.APIError as error:
            raise ChatSourceError(f"the answer broke off: {error.message}") from None
        finally:
            await response.close()  # before the end (Stop, Ctrl-C): the server sees the disconnect and aborts

    async def close(self) -> None:
        await self.client.close()

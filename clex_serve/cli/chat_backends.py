"""Where the terminal chat's answers come from: the engine in this process, or an OpenAI-compatible server.

Both stream an answer as text deltas, and stopping the iteration (Ctrl-C) frees the answer's work: in
process the generator's close aborts the request in the engine thread; against a server, closing the
response makes the server abort it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator

from clex_serve.sampling_params import RequestOutputKind, SamplingParams


class ChatBackendError(RuntimeError):
    """A one-line reason the backend cannot answer (unreachable, refused key, bad request)."""


class InProcessBackend:
    def __init__(self, engine, chat_template: str) -> None:
        from clex_serve.engine.async_engine import AsyncLLMEngine

        self.engine = engine
        self.async_engine = AsyncLLMEngine(engine)
        self.chat_template = chat_template
        self.max_model_len = engine.max_model_len
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="clex-chat-loop", daemon=True)
        self._loop_thread.start()

    def prompt(self, messages: list[dict]) -> dict:
        from clex_serve.text.chat_template import chat_prompt

        return chat_prompt(self.engine.tokenizer, messages, self.engine.model_config.family, True, self.chat_template)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt(messages)["prompt_token_ids"])

    def scale_for(self, num_tokens: int) -> int | None:
        return self.engine.scale_for_length(num_tokens)

    def is_idle(self) -> bool:
        stats = self.async_engine.stats()
        return stats.num_unfinished_requests == 0

    def stream(self, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """Text deltas of the answer. The async engine runs on a loop thread; closing this iterator (Ctrl-C)
        cancels the consumer there, which aborts the request."""
        params = _replace(params, output_kind=RequestOutputKind.DELTA)
        deltas: queue.Queue = queue.Queue()
        end = object()

        async def consume():
            try:
                async for output in self.async_engine.generate(self.prompt(messages), params):
                    deltas.put(output.outputs[0].text)
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                deltas.put(error)
            finally:
                deltas.put(end)

        future = asyncio.run_coroutine_threadsafe(consume(), self.loop)
        try:
            while True:
                item = deltas.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        return
                    raise ChatBackendError(str(item))
                if item:
                    yield item
        finally:
            if not future.done():
                future.cancel()  # the consumer's generator closes: the engine aborts the request
                try:
                    future.result(timeout=10)
                except BaseException:  # noqa: BLE001 - cancelled, as asked
                    pass

    def close(self) -> None:
        self.async_engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


class ServerBackend:
    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        import httpx
        import openai

        self.url = url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=0, timeout=600)
        self._openai = openai
        self._httpx = httpx
        self.api_key = api_key
        try:
            models = self.client.models.list().data
        except openai.AuthenticationError:
            raise ChatBackendError(f"{self.url} refused the API key: pass the right one with --api-key") from None
        except openai.APIConnectionError:
            raise ChatBackendError(f"cannot reach a server at {self.url}: is it running?") from None
        except openai.APIError as error:
            raise ChatBackendError(f"{self.url}: {error.message}") from None
        if not models:
            raise ChatBackendError(f"{self.url} serves no model")
        self.model = model or models[0].id
        card = next((m for m in models if m.id == self.model), models[0])
        self.max_model_len = getattr(card, "max_model_len", None) or (card.model_extra or {}).get("max_model_len")

    def count_tokens(self, messages: list[dict]) -> int | None:
        """Through the server's /tokenize when it has one (clex-serve and vLLM do); None otherwise."""
        base = self.url[:-3] if self.url.endswith("/v1") else self.url
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = self._httpx.post(f"{base}/tokenize", json={"model": self.model, "messages": messages},
                                        headers=headers, timeout=30)
            return response.json()["count"] if response.status_code == 200 else None
        except (self._httpx.HTTPError, KeyError, ValueError):
            return None

    def scale_for(self, num_tokens: int) -> int | None:
        return None  # a server does not say which rotary scale it will use

    def is_idle(self) -> bool:
        return True

    def stream(self, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        openai = self._openai
        extra = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, temperature=params.temperature,
                top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed, extra_body=extra)
        except openai.AuthenticationError:
            raise ChatBackendError(f"{self.url} refused the API key: pass the right one with --api-key") from None
        except openai.APIConnectionError:
            raise ChatBackendError(f"cannot reach a server at {self.url}: is it running?") from None
        except openai.APIStatusError as error:
            body = error.body if isinstance(error.body, dict) else {}
            raise ChatBackendError(f"the server refused the request: {body.get('message', error.message)}") from None
        try:
            for chunk in response:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
        except openai.APIError as error:
            raise ChatBackendError(f"the answer broke off: {error.message}") from None
        finally:
            response.close()  # also on Ctrl-C: the server sees the disconnect and aborts the request

    def close(self) -> None:
        self.client.close()


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)

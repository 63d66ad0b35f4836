"""The interface every chat front end talks to: what the model is, how long a conversation is, which CLEX
scale it runs at, and its answer as a stream of text deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator

from clex_serve.sampling_params import SamplingParams


class ChatSourceError(RuntimeError):
    """A one-line reason the source cannot answer (unreachable, refused key, refused request, broken stream)."""


class ChatSource:
    """Async, for an event loop (the web demo's, or ``SyncChatSource``'s thread). ``model_name`` and
    ``max_model_len`` (None where the server does not say) are set by the constructor."""

    model_name: str
    max_model_len: int | None

    async def count_tokens(self, messages: list[dict]) -> int | None:
        """The prompt length of ``messages`` with the generation prompt; None where it cannot be known."""
        raise NotImplementedError

    def scale_for(self, num_tokens: int) -> int | None:
        """The CLEX scale ``t`` a prompt of ``num_tokens`` tokens runs at; None where the source cannot say."""
        return None

    def is_idle(self) -> bool | None:
        """Whether no answer is being worked on; None where the source cannot say (a server)."""
        return None

    def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str]:
        """The answer as text deltas. Closing the iterator (or cancelling its consumer) frees the request's
        work where it runs. Raises ``ChatSourceError`` for what the user should read."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

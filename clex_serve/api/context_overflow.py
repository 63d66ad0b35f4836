"""One shape for a request that does not fit the model's context, as OpenAI words it: code
``context_length_exceeded``, ``param`` the prompt (or the messages), and both numbers in the message."""

from __future__ import annotations

from clex_serve.api.errors import APIError
from clex_serve.engine.input_processor import PromptTooLongError


def context_overflow(
    max_model_len: int, prompt_len: int, asked: int, prompt_param: str, explicit: bool = True, exact: bool = True
) -> APIError:
    """``asked`` output tokens after a prompt of ``prompt_len``; ``explicit`` when the client asked for them
    (max_tokens), ``exact`` False when ``prompt_len`` is a lower bound (a prompt refused by its length in
    characters, before it was tokenized)."""
    what = "messages" if prompt_param == "messages" else "prompt"
    tokens = f"{prompt_len}" if exact else f"at least {prompt_len}"
    if explicit:
        detail = (
            f"you requested {'' if exact else 'at least '}{prompt_len + asked} tokens ({tokens} in the {what}, "
            f"{asked} in the completion). Please reduce the length of the {what} or completion."
        )
    else:
        detail = (
            f"the {what} {'take' if what == 'messages' else 'takes'} {tokens} tokens, which leaves no room for "
            f"the completion. Please reduce the length of the {what}."
        )
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, {detail}",
        param=prompt_param,
        code="context_length_exceeded",
    )


def overflow_of(error: PromptTooLongError, prompt_param: str) -> APIError:
    """The engine's refusal of a prompt too long for its context, in the same shape."""
    return context_overflow(error.max_model_len, error.num_tokens, 1, prompt_param, explicit=False, exact=error.exact)

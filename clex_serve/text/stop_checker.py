"""When a sequence is done, and what text it may show so far without leaking a stop string.

Pure functions of tokens, text and sampling parameters: the engine's scheduler and output processor apply
what they return to their own sequences.
"""

from __future__ import annotations

from clex_serve.sampling_params import SamplingParams


def token_stop(
    params: SamplingParams,
    token_id: int,
    num_output_tokens: int,
    length: int,
    eos_token_ids: list[int],
    max_model_len: int,
) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) once ``token_id`` was appended, making ``num_output_tokens`` outputs and
    a sequence of ``length`` tokens; None while it goes on."""
    below_min = num_output_tokens < params.min_tokens
    if not below_min and not params.ignore_eos and token_id in eos_token_ids:
        return "stop", None
    if not below_min and token_id in params.stop_token_ids:
        return "stop", token_id
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return "length", None
    if length >= max_model_len:
        return "length", None
    return None


def find_stop_string(
    params: SamplingParams, text: str, new_text_len: int, num_output_tokens: int
) -> tuple[int, str] | None:
    """(where the output text ends, the stop string) for the first stop string in the text just added (and
    the few characters before it); None when there is none."""
    if not params.stop or num_output_tokens < params.min_tokens:
        return None
    longest = max(len(stop) for stop in params.stop)
    search_from = max(0, len(text) - new_text_len - longest + 1)
    found = [(text.find(stop, search_from), stop) for stop in params.stop]
    found = [(index, stop) for index, stop in found if index != -1]
    if not found:
        return None
    index, stop = min(found)
    return (index + len(stop) if params.include_stop_str_in_output else index), stop


def visible_length(params: SamplingParams, text: str, finished: bool) -> int:
    """How much of the text is safe to show now: while running, a tail that could still become a stop string
    is held back. Never shrinks: a stop string found later starts inside the held-back tail."""
    if finished or not params.stop:
        return len(text)
    holdback = max(len(stop) for stop in params.stop) - 1
    return max(0, len(text) - holdback)

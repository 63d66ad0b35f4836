"""When a sequence is done, and what text it may show so far without leaking a stop string."""

from __future__ import annotations

from clex_serve.engine.sequence import Sequence


def check_stop_tokens(seq: Sequence, token_id: int, eos_token_ids: list[int], max_model_len: int) -> None:
    params = seq.params
    below_min = seq.num_output_tokens < params.min_tokens
    if not below_min and not params.ignore_eos and token_id in eos_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", None
    elif not below_min and token_id in params.stop_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", token_id
    elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
        seq.finish_reason = "length"
    elif len(seq) >= max_model_len:
        seq.finish_reason = "length"


def check_stop_strings(seq: Sequence, new_text_len: int) -> None:
    """Look for a stop string in the text just added (and the few characters before it); cut there."""
    params = seq.params
    if not params.stop or seq.num_output_tokens < params.min_tokens:
        return
    longest = max(len(stop) for stop in params.stop)
    search_from = max(0, len(seq.output_text) - new_text_len - longest + 1)
    found = [(seq.output_text.find(stop, search_from), stop) for stop in params.stop]
    found = [(index, stop) for index, stop in found if index != -1]
    if not found:
        return
    index, stop = min(found)
    end = index + len(stop) if params.include_stop_str_in_output else index
    seq.output_text = seq.output_text[:end]
    seq.finish_reason, seq.stop_reason = "stop", stop


def visible_length(seq: Sequence) -> int:
    """How much of the text is safe to show now: while running, a tail that could still become a stop string
    is held back. Never shrinks: a stop string found later starts inside the held-back tail."""
    if seq.finish_reason is not None or not seq.params.stop:
        return len(seq.output_text)
    holdback = max(len(stop) for stop in seq.params.stop) - 1
    return max(0, len(seq.output_text) - holdback)


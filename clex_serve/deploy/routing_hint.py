"""What the router needs to know of a generation request, worked out once at the ingress: the prompt's
token ids as the engine will see them, the scale bucket its prefill will run at, and the chained hashes of
its reusable blocks.

The scale bucket is what the engine keys its prefix cache on (``PrefixKey``): the CLEX scale
``t(P) = min(ceil(P / L0), max_factor)`` of the prompt's length P, and P itself when ``log_scale`` applies.
Plain Python (no Ray).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Hashable
from dataclasses import dataclass

from clex_serve.deploy.prefix_tree import chained_block_hashes


@dataclass(frozen=True)
class RoutingHint:
    bucket: Hashable  # (scale, length or None)
    block_hashes: tuple[int, ...]
    num_prompt_tokens: int


@dataclass(frozen=True)
class ModelView:
    """What the ingress knows of the model, from a replica (``EngineReplica.describe``)."""

    tokenizer: object
    chat_template: str | None
    family: str
    block_size: int
    max_model_len: int
    max_prompt_chars: int
    applies_log_scale: bool
    scale_steps: tuple[tuple[int, int], ...]  # (first length, scale from there on), from length 1

    def scale_for_length(self, num_tokens: int) -> int:
        index = bisect.bisect_right([start for start, _ in self.scale_steps], max(1, num_tokens)) - 1
        return self.scale_steps[index][1]

    def bucket(self, num_tokens: int) -> Hashable:
        return (self.scale_for_length(num_tokens), num_tokens if self.applies_log_scale else None)


def scale_steps(scale_for_length, max_model_len: int) -> tuple[tuple[int, int], ...]:
    """Where ``scale_for_length`` steps up, found with a binary search per step (the schedule is monotone in
    the length), so that the ingress can compute any prompt's scale without the model."""
    low, scale = 1, scale_for_length(1)
    steps = [(1, scale)]
    while low < max_model_len and scale_for_length(max_model_len) > scale:
        lo, hi = low, max_model_len  # the first length with a scale above ``scale``
        while lo < hi:
            mid = (lo + hi) // 2
            if scale_for_length(mid) > scale:
                hi = mid
            else:
                lo = mid + 1
        scale, low = scale_for_length(lo), lo
        steps.append((lo, scale))
    return tuple(steps)


def routing_hint(view: ModelView, path: str, body: bytes) -> RoutingHint | None:
    """The hint for a generation request, or None where there is nothing to route on (another route, a body
    that is not a request the server would accept: the replica answers those, with the server's errors)."""
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    try:
        token_ids = _prompt_token_ids(view, path, request)
    except Exception:  # noqa: BLE001 - whatever the replica will refuse, it refuses with the proper error
        return None
    if token_ids is None:
        return None
    return RoutingHint(
        view.bucket(len(token_ids)),
        tuple(chained_block_hashes(token_ids, view.block_size)),
        len(token_ids),
    )


def _prompt_token_ids(view: ModelView, path: str, request: dict) -> list[int] | None:
    from clex_serve.text.chat_template import chat_prompt

    if path == "/v1/chat/completions":
        messages = request.get("messages")
        if view.chat_template is None or not isinstance(messages, list):
            return None
        conversation = [
            {"role": "system" if m.get("role") == "developer" else m.get("role"), "content": _text(m.get("content"))}
            for m in messages
        ]
        if sum(len(m["content"]) for m in conversation) > view.max_prompt_chars:
            return None
        return chat_prompt(view.tokenizer, conversation, view.family, True, view.chat_template)["prompt_token_ids"]
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        prompt = prompt[0]  # several prompts: route on the first
    if isinstance(prompt, str):
        if len(prompt) > view.max_prompt_chars:
            return None
        return view.tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
        return list(prompt)
    return None


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    raise ValueError("content")

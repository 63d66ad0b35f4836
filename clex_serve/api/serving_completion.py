"""``POST /v1/completions``: one or several prompts (text or token ids), whole or streamed.

``echo`` with ``logprobs`` returns the prompt's tokens and their logprobs before the generated ones (the
first prompt token has none), as lm-evaluation-harness's loglikelihood tasks read them; ``max_tokens: 0``
with ``echo`` scores the prompt alone. The engine still samples one token there (it comes from the same
forward pass that scores the prompt, so it costs nothing more) and the handler drops it.
"""

from __future__ import annotations

import dataclasses
import time

from fastapi import Request

from clex_serve.api.context_overflow import overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.generation import Generation
from clex_serve.api.protocol import CompletionRequest, usage
from clex_serve.api.serving import ServingContext, prompt_logprobs_json
from clex_serve.engine.input_processor import PromptTooLongError
from clex_serve.engine.outputs import CompletionOutput, RequestOutput


def _logprobs_entries(ctx: ServingContext, token_ids, entries, offset: int) -> dict:
    """The legacy completions format for ``token_ids`` and their logprob entries (None where a position
    has none): tokens, their logprobs, the top alternatives, text offsets from ``offset``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, alternatives in zip(token_ids, entries):
        text = ctx.tokenizer.decode([token_id])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if alternatives is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(alternatives[token_id].logprob)
            top_logprobs.append({ctx.tokenizer.decode([tid]): lp.logprob for tid, lp in alternatives.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def completion_logprobs(ctx: ServingContext, completion: CompletionOutput, text_offset: int) -> dict | None:
    if completion.logprobs is None:
        return None
    return _logprobs_entries(ctx, completion.token_ids, completion.logprobs, text_offset)


def echoed_logprobs(ctx: ServingContext, output: RequestOutput) -> dict:
    """The prompt's part of an echoed completion's logprobs."""
    entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return _logprobs_entries(ctx, output.prompt_token_ids, entries, 0)


def _end_offset(prompt_part: dict | None, echo: str) -> int:
    """Where the generated tokens' text offsets start: after the echoed prompt's tokens when they are listed
    (their strings include special tokens such as BOS that the echoed text lacks), else after the text."""
    if prompt_part and prompt_part["tokens"]:
        return prompt_part["text_offset"][-1] + len(prompt_part["tokens"][-1])
    return len(echo)


def _joined(first: dict | None, second: dict | None) -> dict | None:
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


async def create_completion(ctx: ServingContext, body: CompletionRequest, raw_request: Request, request_id: str):
    started = time.monotonic()
    ctx.check_request(body, request_id)
    scoring = body.scores_only()
    if scoring and not body.echo:
        raise APIError(
            400,
            "max_tokens: 0 is allowed only with echo, to score the prompt; ask for at least 1 token",
            param="max_tokens",
        )
    try:
        prompts = body.prompts()
        processed = [await ctx.engine.process_inputs(prompt) for prompt in prompts]
    except PromptTooLongError as error:
        raise overflow_of(error, "prompt") from None
    except ValueError as error:
        raise invalid(error, "prompt") from None
    lengths = [len(item.token_ids) for item in processed]
    requested = 1 if scoring else body.max_tokens
    budgets = [ctx.output_budget(requested, length, "prompt") for length in lengths]
    try:
        constraint, constraint_param = body.output_constraint()
        params = body.to_sampling_params(min(budgets), constraint)
    except ValueError as error:
        raise invalid(error) from None
    if constraint is not None:
        await ctx.compile(params, constraint_param)
    try:
        submitted = [
            ctx.engine.with_params(item, dataclasses.replace(params, max_tokens=budget))
            for item, budget in zip(processed, budgets)
        ]
    except ValueError as error:
        raise invalid(error) from None
    echo_logprobs = body.echo and body.logprobs is not None
    echoes = [item.text if item.text is not None else ctx.tokenizer.decode(item.token_ids) for item in processed]
    streams = [ctx.engine.generate(item, request_id=f"{request_id}-{index}") for index, item in enumerate(submitted)]
    generation = Generation(ctx, request_id, streams, lengths, counts_tokens=not scoring, started=started)
    model, created, n = ctx.served_model_name, int(time.time()), params.n

    def choice_index(prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * n + completion.index

    def chunk(choices, **extra):
        """A completion body and a streamed chunk are the same object ("text_completion")."""
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }

    def whole(outputs):
        choices = []
        for prompt_index, output in enumerate(outputs):
            echo = echoes[prompt_index] if body.echo else ""
            prompt_part = echoed_logprobs(ctx, output) if echo_logprobs else None
            for c in output.outputs:
                if scoring:
                    text, logprobs, finish_reason, stop_reason = echo, prompt_part, "length", None
                else:
                    text, finish_reason, stop_reason = echo + c.text, c.finish_reason, c.stop_reason
                    logprobs = _joined(prompt_part, completion_logprobs(ctx, c, _end_offset(prompt_part, echo)))
                choice = {
                    "index": choice_index(prompt_index, c),
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                }
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(ctx, output)
                choices.append(choice)
        choices.sort(key=lambda choice: choice["index"])
        return chunk(choices, usage=usage(generation.prompt_tokens, generation.generated))

    if not body.stream:
        return await generation.whole(raw_request, whole)

    async def chunks(firsts, outputs):
        offsets: dict[int, int] = {}
        if body.echo:
            for prompt_index, first in enumerate(firsts):
                prompt_part = echoed_logprobs(ctx, first) if echo_logprobs else None
                for i in range(n):
                    offsets[prompt_index * n + i] = _end_offset(prompt_part, echoes[prompt_index])
                    yield chunk(
                        [
                            {
                                "index": prompt_index * n + i,
                                "text": echoes[prompt_index],
                                "logprobs": prompt_part,
                                "finish_reason": None,
                            }
                        ]
                    )
        async for prompt_index, output in outputs:
            for c in output.outputs:
                index = choice_index(prompt_index, c)
                if scoring:  # the sampled token is dropped: only the end is told
                    if c.finish_reason:
                        yield chunk(
                            [
                                {
                                    "index": index,
                                    "text": "",
                                    "logprobs": None,
                                    "finish_reason": "length",
                                    "stop_reason": None,
                                }
                            ]
                        )
                    continue
                if c.text or c.token_ids or c.finish_reason:
                    logprobs = completion_logprobs(ctx, c, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(c.text)
                    yield chunk(
                        [
                            {
                                "index": index,
                                "text": c.text,
                                "logprobs": logprobs,
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason,
                            }
                        ]
                    )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await generation.event_stream(
        chunks,
        (lambda generated: chunk([], usage=usage(generation.prompt_tokens, generated))) if include_usage else None,
    )

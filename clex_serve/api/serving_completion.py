"""``POST /v1/completions``: one or several prompts (text or token ids), whole or streamed."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from clex_serve.api.errors import invalid
from clex_serve.api.protocol import CompletionRequest, usage
from clex_serve.api.serving import ClientDisconnected, ServingContext, merge_streams, prompt_logprobs_json, sse
from clex_serve.engine.outputs import CompletionOutput


def completion_logprobs(ctx: ServingContext, completion: CompletionOutput, text_offset: int) -> dict | None:
    """The legacy completions format: tokens, their logprobs, the top alternatives, text offsets."""
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
        text = ctx.tokenizer.decode([token_id])
        tokens.append(text)
        token_logprobs.append(alternatives[token_id].logprob)
        top_logprobs.append({ctx.tokenizer.decode([tid]): lp.logprob for tid, lp in alternatives.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def create_completion(ctx: ServingContext, body: CompletionRequest, raw_request: Request, request_id: str):
    started = time.monotonic()
    ctx.check_model(body.model)
    ctx.check_engine()
    try:
        prompts = body.prompts()
        processed = [await asyncio.to_thread(ctx.engine.engine.process_inputs, prompt) for prompt in prompts]
    except ValueError as error:
        raise invalid(error, "prompt") from None
    lengths = [len(item.token_ids) for item in processed]
    max_tokens = ctx.max_tokens(body.max_tokens, max(lengths))
    try:
        params = body.to_sampling_params(max_tokens)
    except ValueError as error:
        raise invalid(error) from None
    if body.max_tokens is None:  # the rest of each prompt's own context
        per_prompt = [ctx.max_tokens(None, length) for length in lengths]
    else:
        per_prompt = [max_tokens] * len(prompts)
    echoes = [item.text if item.text is not None else ctx.tokenizer.decode(item.token_ids) for item in processed]
    streams = [ctx.engine.generate({"prompt": item.text, "prompt_token_ids": item.token_ids},
                                   dataclasses.replace(params, max_tokens=budget), f"{request_id}-{index}")
               for index, (item, budget) in enumerate(zip(processed, per_prompt))]
    model, created, n = ctx.served_model_name, int(time.time()), params.n
    prompt_tokens = sum(lengths)

    def choice_index(prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * n + completion.index

    if not body.stream:
        try:
            outputs = await ctx.run_to_end(streams, raw_request)
        except ClientDisconnected:
            ctx.metrics.request_ended("aborted")
            ctx.log(request_id, 499, prompt_tokens, 0, None, started)
            return JSONResponse({}, status_code=499)
        choices, generated = [], 0
        for prompt_index, output in enumerate(outputs):
            echo = echoes[prompt_index] if body.echo else ""
            for c in output.outputs:
                generated += len(c.token_ids)
                choice = {"index": choice_index(prompt_index, c), "text": echo + c.text,
                          "logprobs": completion_logprobs(ctx, c, len(echo)),
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(ctx, output)
                choices.append(choice)
            ctx.metrics.request_ended("finished", output.metrics, lengths[prompt_index],
                                      sum(len(c.token_ids) for c in output.outputs))
        choices.sort(key=lambda choice: choice["index"])
        ctx.log(request_id, 200, prompt_tokens, generated, outputs[0].metrics.time_to_first_token, started)
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(prompt_tokens, generated)})

    try:
        firsts = [await ctx.first_output(stream) for stream in streams]
    except Exception:
        for stream in streams:
            await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def replay_first(index):
        yield firsts[index]
        async for output in streams[index]:
            yield output

    def chunk(choices, **extra):
        return sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, **extra})

    async def events():
        generated, outcome, first_metrics = 0, "aborted", firsts[0].metrics
        offsets: dict[int, int] = {}
        try:
            if body.echo:
                for prompt_index in range(len(prompts)):
                    for i in range(n):
                        offsets[prompt_index * n + i] = len(echoes[prompt_index])
                        yield chunk([{"index": prompt_index * n + i, "text": echoes[prompt_index], "logprobs": None,
                                      "finish_reason": None}])
            async for prompt_index, output in merge_streams([replay_first(i) for i in range(len(streams))]):
                ctx.metrics.observe_tokens(output.metrics)
                for c in output.outputs:
                    generated += len(c.token_ids)
                    if c.text or c.token_ids or c.finish_reason:
                        index = choice_index(prompt_index, c)
                        logprobs = completion_logprobs(ctx, c, offsets.get(index, 0))
                        offsets[index] = offsets.get(index, 0) + len(c.text)
                        yield chunk([{"index": index, "text": c.text, "logprobs": logprobs,
                                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
            if include_usage:
                yield chunk([], usage=usage(prompt_tokens, generated))
            outcome = "finished"
            yield "[DONE]"
        except Exception as error:
            outcome = "failed"
            yield ctx.engine_error(error).sse_data()
        finally:
            for stream in streams:
                await stream.aclose()
            ctx.metrics.request_ended(outcome, first_metrics, prompt_tokens, generated)
            ctx.log(request_id, 200, prompt_tokens, generated, first_metrics.time_to_first_token, started)

    return EventSourceResponse(events(), ping=15, headers={"X-Request-Id": request_id})

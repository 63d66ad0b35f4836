"""``POST /v1/chat/completions``: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from clex_serve.api.context_overflow import overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.protocol import ChatCompletionRequest, usage
from clex_serve.api.serving import STREAM_STATUS, ClientDisconnected, ServingContext, prompt_logprobs_json, sse
from clex_serve.engine.input_processor import PromptTooLongError
from clex_serve.engine.outputs import CompletionOutput
from clex_serve.text.chat_template import chat_prompt


def chat_logprobs(ctx: ServingContext, completion: CompletionOutput, top_n: int) -> dict | None:
    if completion.logprobs is None:
        return None
    content = []
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
        def entry(tid, logprob):
            text = ctx.tokenizer.decode([tid])
            return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode("utf-8"))}

        top = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)[:top_n]
        item = entry(token_id, alternatives[token_id])
        item["top_logprobs"] = [entry(tid, logprob) for tid, logprob in top]
        content.append(item)
    return {"content": content}


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, raw_request: Request,
                                 request_id: str):
    started = time.monotonic()
    ctx.check_request(body, request_id)
    template = ctx.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template: start the server with --chat-template (vicuna, "
                            "zephyr, or a Jinja file), or use /v1/completions", param="messages",
                       code="no_chat_template")
    conversation = body.conversation()
    try:
        ctx.engine.check_text_length(sum(len(m["content"]) for m in conversation), "the messages")
        prompt = await asyncio.to_thread(chat_prompt, ctx.tokenizer, conversation, ctx.family, True, template)
    except PromptTooLongError as error:
        raise overflow_of(error, "messages") from None
    except ValueError as error:
        raise invalid(error, "messages") from None
    except Exception as error:  # a template that fails on these messages (raise_exception in Jinja)
        raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None
    prompt_len = len(prompt["prompt_token_ids"])
    requested, _ = body.requested_max_tokens()
    max_tokens = ctx.output_budget(requested, prompt_len, "messages")
    try:
        params = body.to_sampling_params(max_tokens)
    except ValueError as error:
        raise invalid(error) from None
    top_n = body.top_logprobs or 0
    model, created = ctx.served_model_name, int(time.time())
    stream = ctx.engine.generate(prompt, params, request_id)

    if not body.stream:
        try:
            [output] = await ctx.run_to_end([stream], raw_request)
        except ClientDisconnected:
            ctx.metrics.request_ended("aborted")
            ctx.log(request_id, 499, prompt_len, 0, None, started)
            return JSONResponse({}, status_code=499)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(ctx, c, top_n), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in output.outputs]
        generated = sum(len(c.token_ids) for c in output.outputs)
        ctx.metrics.request_ended("finished", output.metrics, prompt_len, generated)
        ctx.log(request_id, 200, prompt_len, generated, output.metrics.time_to_first_token, started)
        response = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(prompt_len, generated)}
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(ctx, output)
        return JSONResponse(response)

    first = await ctx.first_output(stream)  # submission errors become HTTP errors before the stream starts
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, **extra):
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra})

    async def events():
        generated, metrics, outcome = 0, None, "aborted"
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)])
            output = first
            while True:
                metrics = output.metrics
                ctx.metrics.observe_tokens(metrics)
                for completion in output.outputs:
                    generated += len(completion.token_ids)
                    if completion.text or completion.token_ids or completion.finish_reason:
                        delta = {"content": completion.text} if completion.text else {}
                        yield chunk([{"index": completion.index, "delta": delta,
                                      "logprobs": chat_logprobs(ctx, completion, top_n),
                                      "finish_reason": completion.finish_reason,
                                      "stop_reason": completion.stop_reason}])
                if output.finished:
                    break
                output = await stream.__anext__()
            if include_usage:
                yield chunk([], usage=usage(prompt_len, generated))
            outcome = "finished"
            yield "[DONE]"
        except Exception as error:  # an error mid-stream: an OpenAI error event, then the end
            outcome = "failed"
            yield ctx.engine_error(error).sse_data()
        finally:
            await stream.aclose()
            ctx.metrics.request_ended(outcome, metrics, prompt_len, generated)
            ctx.log(request_id, STREAM_STATUS[outcome], prompt_len, generated,
                    metrics.time_to_first_token if metrics else None, started)

    return EventSourceResponse(events(), ping=15, headers={"X-Request-Id": request_id})

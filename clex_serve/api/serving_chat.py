"""``POST /v1/chat/completions``: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from clex_serve.api.context_overflow import overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.generation import Generation
from clex_serve.api.protocol import ChatCompletionRequest, usage
from clex_serve.api.serving import ServingContext, prompt_logprobs_json
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


async def create_chat_completion(
    ctx: ServingContext, body: ChatCompletionRequest, raw_request: Request, request_id: str
):
    started = time.monotonic()
    ctx.check_request(body, request_id)
    prompt = await _render(ctx, body)
    prompt_len = len(prompt["prompt_token_ids"])
    requested, _ = body.requested_max_tokens()
    try:
        params = body.to_sampling_params(ctx.output_budget(requested, prompt_len, "messages"))
    except ValueError as error:
        raise invalid(error) from None
    generation = Generation(
        ctx, request_id, [ctx.engine.generate(prompt, params, request_id)], [prompt_len], started=started
    )
    top_n = body.top_logprobs or 0
    model, created = ctx.served_model_name, int(time.time())

    def whole(outputs):
        [output] = outputs
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(ctx, c, top_n),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in output.outputs
        ]
        response = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(prompt_len, generation.generated),
        }
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(ctx, output)
        return response

    if not body.stream:
        return await generation.whole(raw_request, whole)

    def chunk(choices, **extra):
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }

    async def chunks(firsts, outputs):
        yield chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(params.n)
            ]
        )
        async for _, output in outputs:
            for completion in output.outputs:
                if completion.text or completion.token_ids or completion.finish_reason:
                    delta = {"content": completion.text} if completion.text else {}
                    yield chunk(
                        [
                            {
                                "index": completion.index,
                                "delta": delta,
                                "logprobs": chat_logprobs(ctx, completion, top_n),
                                "finish_reason": completion.finish_reason,
                                "stop_reason": completion.stop_reason,
                            }
                        ]
                    )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await generation.event_stream(
        chunks, (lambda generated: chunk([], usage=usage(prompt_len, generated))) if include_usage else None
    )


async def _render(ctx: ServingContext, body: ChatCompletionRequest) -> dict:
    """The conversation through the chat template: the engine prompt (text and token ids)."""
    if ctx.chat_template is None:
        raise APIError(
            400,
            "this model has no chat template: start the server with --chat-template (vicuna, "
            "zephyr, or a Jinja file), or use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    conversation = body.conversation()
    try:
        ctx.engine.check_text_length(sum(len(m["content"]) for m in conversation), "the messages")
        return await asyncio.to_thread(chat_prompt, ctx.tokenizer, conversation, ctx.family, True, ctx.chat_template)
    except PromptTooLongError as error:
        raise overflow_of(error, "messages") from None
    except ValueError as error:
        raise invalid(error, "messages") from None
    except Exception as error:  # a template that fails on these messages (raise_exception in Jinja)
        raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None

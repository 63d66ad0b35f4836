"""``POST /v1/chat/completions``: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from clex_serve.api.chat_tools import ChatTools
from clex_serve.api.context_overflow import overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.generation import Generation
from clex_serve.api.protocol import ChatCompletionRequest, usage
from clex_serve.api.serving import ServingContext, prompt_logprobs_json
from clex_serve.engine.input_processor import ProcessedPrompt, PromptTooLongError
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
    tools, processed = await prepare_chat(ctx, body)
    params, prompt_len = processed.params, len(processed.token_ids)
    generation = Generation(
        ctx, request_id, [ctx.engine.generate(processed, request_id=request_id)], [prompt_len], started=started
    )
    top_n = body.top_logprobs or 0
    model, created = ctx.served_model_name, int(time.time())

    def message_of(completion: CompletionOutput) -> tuple[dict, str | None]:
        message = {"role": "assistant", "content": completion.text}
        finish_reason = completion.finish_reason
        if tools.active:
            content, calls = tools.parser.extract(completion.text)
            # A forced call's output is calls only: what is left is a call cut short by max_tokens.
            message["content"] = None if tools.forced and calls else content
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return message, finish_reason

    def whole(outputs):
        [output] = outputs
        choices = []
        for c in output.outputs:
            message, finish_reason = message_of(c)
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": chat_logprobs(ctx, c, top_n),
                    "finish_reason": finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
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

    # One tool-call reader per choice: it holds back text that may open a call and hands out call deltas.
    streamers = [tools.parser.streamer() if tools.active else None for _ in range(params.n)]

    def delta_of(completion: CompletionOutput) -> tuple[dict, str | None]:
        streamer = streamers[completion.index]
        if streamer is None:
            return ({"content": completion.text} if completion.text else {}), completion.finish_reason
        content, call_deltas = streamer.feed(completion.text, final=completion.finish_reason is not None)
        delta = {"content": content} if content else {}
        if call_deltas:
            delta["tool_calls"] = call_deltas
        finish_reason = completion.finish_reason
        if finish_reason == "stop" and streamer.num_calls:
            finish_reason = "tool_calls"
        return delta, finish_reason

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
                    delta, finish_reason = delta_of(completion)
                    if not delta and finish_reason is None and not completion.logprobs:
                        continue  # held back: text that may begin a tool call
                    yield chunk(
                        [
                            {
                                "index": completion.index,
                                "delta": delta,
                                "logprobs": chat_logprobs(ctx, completion, top_n),
                                "finish_reason": finish_reason,
                                "stop_reason": completion.stop_reason,
                            }
                        ]
                    )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await generation.event_stream(
        chunks, (lambda generated: chunk([], usage=usage(prompt_len, generated))) if include_usage else None
    )


async def prepare_chat(ctx: ServingContext, body: ChatCompletionRequest) -> tuple[ChatTools, ProcessedPrompt]:
    """A checked chat request: its tools, and its prompt rendered and checked with its sampling parameters
    and its output constraint compiled (HTTP errors naming the parameter otherwise)."""
    tools, constraint, constraint_param = _constraints(ctx, body)
    prompt = await render_prompt(ctx, body, tools)
    prompt_len = len(prompt["prompt_token_ids"])
    requested, _ = body.requested_max_tokens()
    try:
        params = body.to_sampling_params(ctx.output_budget(requested, prompt_len, "messages"), constraint)
    except ValueError as error:
        raise invalid(error) from None
    return tools, await ctx.process(prompt, params, constraint_param)


def _constraints(ctx: ServingContext, body: ChatCompletionRequest):
    """The request's tools, and what its output must match with the parameter that asked for it."""
    try:
        tools = ChatTools.of(body, ctx.tool_parser)
        constraint, param = body.output_constraint()
    except ValueError as error:
        raise invalid(error) from None
    if tools.forced and constraint is not None:
        raise APIError(
            400,
            f"tool_choice: a required tool call and {param} both constrain the output; give one",
            param="tool_choice",
        )
    if constraint is None and tools.active:
        constraint, param = tools.constraint(), ("tool_choice" if tools.forced else "tools")
    return tools, constraint, param


async def render_prompt(
    ctx: ServingContext, body: ChatCompletionRequest, tools: ChatTools, add_generation_prompt: bool = True
) -> dict:
    """The conversation through the chat template: the engine prompt (text and token ids)."""
    if ctx.chat_template is None:
        raise APIError(
            400,
            "this model has no chat template: start the server with --chat-template (vicuna, "
            "zephyr, or a Jinja file), or use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    conversation, template_tools = tools.conversation(body.messages, ctx.chat_template)
    try:
        ctx.engine.check_text_length(sum(len(m["content"]) for m in conversation), "the messages")
        return await asyncio.to_thread(
            chat_prompt,
            ctx.tokenizer,
            conversation,
            ctx.family,
            add_generation_prompt,
            ctx.chat_template,
            template_tools,
        )
    except PromptTooLongError as error:
        raise overflow_of(error, "messages") from None
    except ValueError as error:
        raise invalid(error, "messages") from None
    except Exception as error:  # a template that fails on these messages (raise_exception in Jinja)
        raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None

"""``POST /v1/responses``: OpenAI's Responses API over the chat path (template, tools, constraints), whole or
streamed as its typed events: ``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, its content (``response.content_part.added``, ``response.output_text.delta``
... ``.done``, or ``response.function_call_arguments.delta`` ... ``.done``) and ``response.output_item.done``,
and last ``response.completed`` (``response.incomplete`` when max_output_tokens cut it)."""

from __future__ import annotations

import secrets
import time

from fastapi import Request

from clex_serve.api.errors import APIError, invalid
from clex_serve.api.generation import Generation
from clex_serve.api.protocol_responses import ResponsesRequest
from clex_serve.api.serving import ServingContext
from clex_serve.api.serving_chat import prepare_chat
from clex_serve.engine.outputs import CompletionOutput

_RESPONSES_NAMES = {"response_format": "text.format", "messages": "input", "max_tokens": "max_output_tokens"}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


async def create_response(ctx: ServingContext, body: ResponsesRequest, raw_request: Request, request_id: str):
    started = time.monotonic()
    ctx.check_model(body.model)
    ctx.check_engine()
    refused = body.unsupported()
    if refused:
        raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
    try:
        chat = body.to_chat()
    except ValueError as error:
        raise invalid(error, "input") from None
    try:
        tools, processed = await prepare_chat(ctx, chat)
    except APIError as error:  # named as the chat request calls them: the Responses API's names instead
        error.param = _RESPONSES_NAMES.get(error.param, error.param)
        error.message = error.message.replace("response_format", "text.format").replace("messages", "input")
        raise
    prompt_len = len(processed.token_ids)
    generation = Generation(
        ctx, request_id, [ctx.engine.generate(processed, request_id=request_id)], [prompt_len], started=started
    )
    created = int(time.time())

    def response(status: str, output: list[dict], finish_reason: str | None = None) -> dict:
        incomplete = status == "completed" and finish_reason == "length"
        return {
            "id": request_id,
            "object": "response",
            "created_at": created,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None,
            "model": ctx.served_model_name,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "tool_choice": _tool_choice_json(body),
            "tools": [tool.model_dump(by_alias=True, exclude_none=True) for tool in body.tools or []],
            "text": {"format": _format_json(body)},
            "truncation": body.truncation or "disabled",
            "store": False,
            "metadata": body.metadata or {},
            "usage": None
            if status != "completed"
            else {
                "input_tokens": prompt_len,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": generation.generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_len + generation.generated,
            },
        }

    def output_items(completion: CompletionOutput) -> list[dict]:
        text, calls = completion.text, []
        if tools.active:
            text, calls = tools.parser.extract(completion.text)
            text = None if tools.forced and calls else text
        items = [message_item(_item_id("msg"), text)] if text else []
        items += [function_call_item(_item_id("fc"), call.id, call.name, call.arguments) for call in calls]
        return items

    if not body.stream:

        def whole(outputs):
            [output] = outputs
            [completion] = output.outputs
            return response("completed", output_items(completion), completion.finish_reason)

        return await generation.whole(raw_request, whole)

    async def events(firsts, outputs):
        writer = _EventWriter(tools.parser.streamer() if tools.active else None)
        yield writer.event("response.created", response=response("in_progress", []))
        yield writer.event("response.in_progress", response=response("in_progress", []))
        finish_reason = None
        async for _, output in outputs:
            [completion] = output.outputs
            for event in writer.feed(completion.text, completion.finish_reason is not None):
                yield event
            finish_reason = completion.finish_reason or finish_reason
        for event in writer.close():
            yield event
        final = response("completed", writer.items, finish_reason)
        yield writer.event(
            "response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final
        )

    return await generation.event_stream(events, None, typed_events=True)


class _EventWriter:
    """The output items of a streamed response and the events that build them, numbered in order."""

    def __init__(self, tool_stream) -> None:
        self.tool_stream = tool_stream
        self.items: list[dict] = []
        self.sequence_number = 0
        self._message: dict | None = None  # the message item being written, with its text so far
        self._call: dict | None = None

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def feed(self, text: str, final: bool) -> list[dict]:
        if self.tool_stream is None:
            return self._text(text)
        content, call_deltas = self.tool_stream.feed(text, final)
        events = self._text(content)
        for delta in call_deltas:
            if "id" in delta:
                events += self._close_message() + self._close_call()
                item = function_call_item(_item_id("fc"), delta["id"], delta["function"]["name"], "", "in_progress")
                self._call = item
                events.append(self.event("response.output_item.added", output_index=len(self.items), item=dict(item)))
                self.items.append(item)
            fragment = delta["function"].get("arguments", "")
            if fragment:
                self._call["arguments"] += fragment
                events.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self._call["id"],
                        output_index=len(self.items) - 1,
                        delta=fragment,
                    )
                )
        return events

    def close(self) -> list[dict]:
        return self._close_message() + self._close_call()

    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        events = []
        if self._message is None:
            events += self._close_call()
            item = message_item(_item_id("msg"), "", "in_progress")
            self._message = item
            item["_text"] = ""
            index = len(self.items)
            self.items.append(item)
            events.append(self.event("response.output_item.added", output_index=index, item=_public(item)))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self.event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        self._message["_text"] += text
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=self.items.index(self._message),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _close_message(self) -> list[dict]:
        item, self._message = self._message, None
        if item is None:
            return []
        index, text = self.items.index(item), item.pop("_text")
        done = message_item(item["id"], text)
        self.items[index] = done
        part = done["content"][0]
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self.event("response.output_text.done", **common, text=text, logprobs=[]),
            self.event("response.content_part.done", **common, part=part),
            self.event("response.output_item.done", output_index=index, item=done),
        ]

    def _close_call(self) -> list[dict]:
        item, self._call = self._call, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = "completed"
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=dict(item)),
        ]


def _public(item: dict) -> dict:
    return {key: value for key, value in item.items() if not key.startswith("_")}


def _tool_choice_json(body: ResponsesRequest):
    choice = body.tool_choice
    if choice is None:
        return "auto" if body.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()


def _format_json(body: ResponsesRequest) -> dict:
    text_format = body.text.format if body.text else None
    if text_format is None:
        return {"type": "text"}
    return text_format.model_dump(by_alias=True, exclude_none=True)

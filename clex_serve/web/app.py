"""The Gradio chat: streaming answers, a system prompt, sampling controls, Stop / Retry / Undo / Clear, and a
line with the tokens used against the context and the CLEX scale the next turn runs at.

Each browser tab holds its own conversation (Gradio's per-session state): the messages as written, which
the model reads back; the chat box shows them through ``display_markdown``, so that code stays code. Events
run without Gradio's one-at-a-time queue limit, so several users stream at once and the engine batches them.
Stop cancels the streaming handler, which closes its source stream and so ends the request where it runs.
"""

from __future__ import annotations

from clex_serve.cli.answer_markdown import display_markdown
from clex_serve.sampling_params import SamplingParams


def _with_system(conversation: list[dict], system: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + conversation


def _shown(conversation: list[dict]) -> list[dict]:
    """The chat box's messages: the conversation's, as markdown that keeps their code as code."""
    return [{"role": message["role"], "content": display_markdown(message["content"])} for message in conversation]


def build_demo(source, title: str = "clex-serve"):
    import gradio as gr

    limit = source.max_model_len

    async def status_line(messages: list[dict]) -> str:
        used = await source.count_tokens(messages) if messages else 0
        parts = [f"Tokens: {used if used is not None else '?'}" + (f" / {limit}" if limit else "")]
        scale = source.scale_for((used or 0) + 1) if used is not None else None
        if scale is not None:
            parts.append(f"CLEX scale t = {scale}")
        return " · ".join(parts)

    async def respond(message, conversation, system, temperature, top_p, top_k, max_new_tokens, repetition_penalty):
        conversation = list(conversation or [])
        if message and message.strip():
            conversation.append({"role": "user", "content": message})
        messages = _with_system(conversation, system)
        if not messages or messages[-1]["role"] != "user":
            yield _shown(conversation), "", await status_line(messages), conversation
            return
        used = await source.count_tokens(messages)
        if used is not None and limit and used >= limit:
            conversation.append(
                {
                    "role": "assistant",
                    "content": (
                        f"(This conversation is {used} tokens; the model reads at most {limit}. Shorten the message, "
                        f"undo it, or clear the conversation.)"
                    ),
                }
            )
            yield _shown(conversation), "", await status_line(messages), conversation
            return
        budget = int(max_new_tokens) if not limit or used is None else max(1, min(int(max_new_tokens), limit - used))
        params = SamplingParams(
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
            max_tokens=budget,
        )
        answer = {"role": "assistant", "content": ""}
        conversation.append(answer)
        status = await status_line(messages)
        yield _shown(conversation), "", status, conversation
        async for delta in source.stream(messages, params):
            answer["content"] += delta
            yield _shown(conversation), "", status, conversation
        yield _shown(conversation), "", await status_line(_with_system(conversation, system)), conversation

    def undo(conversation):
        conversation = list(conversation or [])
        while conversation and conversation[-1]["role"] == "assistant":
            conversation.pop()
        if conversation:
            conversation.pop()
        return _shown(conversation), conversation

    def drop_answer(conversation):
        conversation = list(conversation or [])
        if conversation and conversation[-1]["role"] == "assistant":
            conversation.pop()
        return _shown(conversation), conversation

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nModel: `{source.model_name}`")
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="conversation")
        status = gr.Markdown("Tokens: 0" + (f" / {limit}" if limit else ""), elem_id="status")
        with gr.Row():
            box = gr.Textbox(
                placeholder="Message (Enter sends)", show_label=False, scale=6, lines=1, max_lines=12, elem_id="message"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        with gr.Row():
            retry = gr.Button("Retry", elem_id="retry")
            undo_button = gr.Button("Undo", elem_id="undo")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(label="System prompt", lines=2)
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)")
            max_new_tokens = gr.Slider(
                1,
                max(16, min(limit or 4096, 4096)),
                value=min(512, limit or 512),
                step=1,
                label="Max new tokens",
                elem_id="max-new-tokens",
            )
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")

        conversation = gr.State([])  # the messages as written; the chat box shows them as display markdown
        controls = [system, temperature, top_p, top_k, max_new_tokens, repetition_penalty]
        outputs = [chatbot, box, status, conversation]
        submitted = box.submit(respond, [box, conversation, *controls], outputs, concurrency_limit=None)
        clicked = send.click(respond, [box, conversation, *controls], outputs, concurrency_limit=None)
        retried = retry.click(drop_answer, conversation, [chatbot, conversation]).then(
            respond, [gr.State(""), conversation, *controls], outputs, concurrency_limit=None
        )
        stop.click(None, None, None, cancels=[submitted, clicked, retried])
        undo_button.click(undo, conversation, [chatbot, conversation])
        clear.click(
            lambda: ([], "Tokens: 0" + (f" / {limit}" if limit else ""), []), None, [chatbot, status, conversation]
        )
    return demo

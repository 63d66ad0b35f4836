"""The Gradio chat: streaming answers, a system prompt, sampling controls, Stop / Retry / Undo / Clear, and a
line with the tokens used against the context and the CLEX scale the next turn runs at.

Each browser tab holds its own conversation (Gradio's per-session state). Events run without Gradio's
one-at-a-time queue limit, so several users stream at once and the engine batches them. Stop cancels the
streaming handler, which closes its source stream and so ends the request where it runs.
"""

from __future__ import annotations

from clex_serve.sampling_params import SamplingParams


def _text(content) -> str:
    """Gradio hands message content back as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def _conversation(history: list, system: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for item in history:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": _text(content)})
    return messages


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

    async def respond(message, history, system, temperature, top_p, top_k, max_new_tokens, repetition_penalty):
        history = list(history or [])
        if message and message.strip():
            history.append({"role": "user", "content": message})
        messages = _conversation(history, system)
        if not messages or messages[-1]["role"] != "user":
            yield history, "", await status_line(messages)
            return
        used = await source.count_tokens(messages)
        if used is not None and limit and used >= limit:
            history.append({"role": "assistant", "content": (
                f"(This conversation is {used} tokens; the model reads at most {limit}. Shorten the message, "
                f"undo it, or clear the conversation.)")})
            yield history, "", await status_line(messages)
            return
        budget = int(max_new_tokens) if not limit or used is None else max(1, min(int(max_new_tokens), limit - used))
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                repetition_penalty=float(repetition_penalty), max_tokens=budget)
        history.append({"role": "assistant", "content": ""})
        status = await status_line(messages)
        yield history, "", status
        async for delta in source.stream(messages, params):
            history[-1]["content"] += delta
            yield history, "", status
        yield history, "", await status_line(_conversation(history, system))

    def undo(history):
        history = list(history or [])
        while history and (history[-1].get("role") if isinstance(history[-1], dict) else None) == "assistant":
            history.pop()
        if history:
            history.pop()
        return history

    def drop_answer(history):
        history = list(history or [])
        if history and isinstance(history[-1], dict) and history[-1].get("role") == "assistant":
            history.pop()
        return history

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nModel: `{source.model_name}`")
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="conversation")
        status = gr.Markdown("Tokens: 0" + (f" / {limit}" if limit else ""), elem_id="status")
        with gr.Row():
            box = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, scale=6, lines=1, max_lines=12,
                             elem_id="message")
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
            max_new_tokens = gr.Slider(1, max(16, min(limit or 4096, 4096)), value=min(512, limit or 512), step=1,
                                       label="Max new tokens", elem_id="max-new-tokens")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")

        controls = [system, temperature, top_p, top_k, max_new_tokens, repetition_penalty]
        outputs = [chatbot, box, status]
        submitted = box.submit(respond, [box, chatbot, *controls], outputs, concurrency_limit=None)
        clicked = send.click(respond, [box, chatbot, *controls], outputs, concurrency_limit=None)
        retried = retry.click(drop_answer, chatbot, chatbot).then(
            respond, [gr.State(""), chatbot, *controls], outputs, concurrency_limit=None)
        stop.click(None, None, None, cancels=[submitted, clicked, retried])
        undo_button.click(undo, chatbot, chatbot)
        clear.click(lambda: ([], "Tokens: 0" + (f" / {limit}" if limit else "")), None, [chatbot, status])
    return demo

"""Chat prompts: the checkpoint's own template when it has one, otherwise the format its family was tuned on.

The CLEX Llama chat models were tuned on Vicuna v1.1, the Mixtral chat model on a Zephyr-style format;
neither released tokenizer carries a template. Templates write the BOS token themselves, and the rendered
prompt is tokenized without adding special tokens, as transformers' ``apply_chat_template(tokenize=True)``
does: one BOS, never two.
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

VICUNA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    '{% set turns = messages[1:] %}{% else %}{% set system = "' + VICUNA_SYSTEM + '" %}'
    "{% set turns = messages %}{% endif %}"
    "{{ bos_token + system }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{{ bos_token }}"
    "{% if not messages or messages[0]['role'] != 'system' %}{{ '<|system|>\\n' + eos_token + '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


BUILTIN_TEMPLATES = {"vicuna": VICUNA_TEMPLATE, "zephyr": ZEPHYR_TEMPLATE}


def fallback_template(family: str) -> str:
    return ZEPHYR_TEMPLATE if family == "mixtral" else VICUNA_TEMPLATE


def resolve_chat_template(tokenizer, model_name: str, override: str | None = None) -> str | None:
    """The template a model's chats use: ``override`` (a built-in name or a file) when given, else the
    tokenizer's own, else the built-in one of a released CLEX chat model (recognised by its name), else None:
    the model has no chat format."""
    if override:
        if override in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[override]
        try:
            with open(override, encoding="utf-8") as handle:
                return handle.read()
        except OSError:
            raise ValueError(
                f"chat template {override!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a readable file"
            ) from None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    name = model_name.lower()
    if "clex" in name and "chat" in name:
        return ZEPHYR_TEMPLATE if "mixtral" in name else VICUNA_TEMPLATE
    return None


def render_chat(
    tokenizer,
    messages: list[dict],
    family: str,
    add_generation_prompt: bool = True,
    template: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The conversation as text. ``tools`` (OpenAI's function tools) go to a template that handles them, with
    ``tool`` messages and assistant ``tool_calls`` in the history."""
    roles = ("system", "user", "assistant", "tool") if tools is not None else ("system", "user", "assistant")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in roles:
            raise ValueError(f"each message needs a role of {', '.join(roles)}, and a content string")
        if not isinstance(message.get("content"), str):
            raise ValueError("message content must be a string")
    template = template or getattr(tokenizer, "chat_template", None) or fallback_template(family)
    extra = {"tools": tools} if tools is not None else {}
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def chat_prompt(
    tokenizer,
    messages: list[dict],
    family: str,
    add_generation_prompt: bool = True,
    template: str | None = None,
    tools: list[dict] | None = None,
) -> dict:
    """The engine prompt of a conversation: its text and its token ids (no special tokens added on top)."""
    text = render_chat(tokenizer, messages, family, add_generation_prompt, template, tools)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

"""The OpenAI API's request bodies (with vLLM's sampling extensions), as pydantic models.

Every field carries its bounds (they are the OpenAPI description too), booleans and numbers are strict (``0``
is not ``false``), and text must be valid Unicode. Each request model owns its translation into
``SamplingParams``; a value the engine would refuse raises ``ValueError``, which the app turns into a 400
naming the parameter. OpenAI parameters the server does not implement are declared, so that a request using
them is refused with a 400 naming them (``unsupported()``) instead of being answered as if they had worked;
fields the API does not have are kept aside (``unknown_fields()``) and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from clex_serve.api import limits
from clex_serve.engine.input_processor import check_unicode
from clex_serve.sampling_params import RequestOutputKind, SamplingParams


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``), which no tokenizer can encode: refused where the body
    is parsed, so that the 400 names the field."""
    check_unicode(text, "the text")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopString = Annotated[str, Field(max_length=limits.MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]

# Accepted and without effect on the answer: bookkeeping fields of OpenAI's API.
NO_OP_FIELDS = frozenset({"store", "metadata", "service_tier", "user", "safety_identifier", "prompt_cache_key"})


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def unknown_fields(self) -> list[str]:
        """Fields that are not part of the API (kept by ``extra="allow"`` so that they can be logged)."""
        return sorted(name for name in (self.model_extra or {}) if name not in NO_OP_FIELDS)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


def _not_supported(feature: str) -> str:
    return f"{feature} is not supported by this server yet; the request was refused rather than answered without it"


class SamplingFields(OpenAIModel):
    """What chat and completion requests share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=limits.MAX_N)
    stop: (
        StopString
        | Annotated[list[Annotated[StopString, Field(min_length=1)]], Field(max_length=limits.MAX_STOP_SEQUENCES)]
        | None
    ) = None
    seed: int | None = Field(None, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=limits.MAX_LOGIT_BIAS, description="token id (a decimal string) -> bias in [-100, 100]"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=limits.MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    # Not implemented yet (structured outputs): refused when they ask for something.
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}; others are refused')
    guided_json: Any = Field(None, description="refused: not supported yet")
    guided_regex: Any = Field(None, description="refused: not supported yet")
    guided_choice: Any = Field(None, description="refused: not supported yet")
    guided_grammar: Any = Field(None, description="refused: not supported yet")
    structured_outputs: Any = Field(None, description="refused: not supported yet")

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for the first parameter that asks for what this server cannot do."""
        if self.response_format is not None and self.response_format.get("type") != "text":
            kind = self.response_format.get("type")
            return "response_format", _not_supported(f"response_format of type {kind!r} (structured outputs)")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(self, name) is not None:
                return name, _not_supported(f"{name} (structured outputs)")
        return None

    def parsed_logit_bias(self) -> dict[int, float]:
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():  # OpenAI's keys are token ids written as strings
                raise ValueError(f"logit_bias: key {key!r} is not a token id (a non-negative integer)")
            biases[int(key)] = bias
        return biases

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.parsed_logit_bias(),
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class ContentPart(OpenAIModel):
    type: str = Field(description='only "text": this server\'s models read text')
    text: Text | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = Field(None, description="refused: tool calling is not supported yet")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    # Not implemented yet (tool calling and other modalities): refused when they ask for something.
    tools: list[Any] | None = Field(None, description="refused when not empty: tool calling is not supported yet")
    tool_choice: Any = Field(None, description='only "none"; others are refused')
    parallel_tool_calls: bool | None = Field(None, description="refused: tool calling is not supported yet")
    functions: list[Any] | None = Field(None, description="refused: function calling is not supported")
    function_call: Any = Field(None, description='only "none"; others are refused')
    modalities: list[str] | None = Field(None, description='only ["text"]')
    audio: Any = Field(None, description="refused: this server's models read and write text")
    prediction: Any = Field(None, description="refused: predicted outputs are not supported")
    web_search_options: Any = Field(None, description="refused: web search is not supported")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output budget asked for, and the name of the parameter that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", _not_supported("tool calling (tools)")
        if self.tool_choice not in (None, "none"):
            return "tool_choice", _not_supported(f"tool_choice {self.tool_choice!r} (tool calling)")
        if self.parallel_tool_calls is not None:
            return "parallel_tool_calls", _not_supported("parallel_tool_calls (tool calling)")
        if self.functions:
            return "functions", _not_supported("function calling (functions)")
        if self.function_call not in (None, "none"):
            return "function_call", _not_supported("function calling (function_call)")
        if self.modalities not in (None, ["text"]):
            return "modalities", _not_supported(f'output modalities {self.modalities!r} (only ["text"])')
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                return name, _not_supported(name)
        for index, message in enumerate(self.messages):
            refused = _unsupported_in_message(index, message)
            if refused:
                return refused
        return super().unsupported()

    def conversation(self) -> list[dict]:
        """Messages as chat templates take them ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


def _unsupported_in_message(index: int, message: ChatMessage) -> tuple[str, str] | None:
    where = f"messages[{index}]"
    if message.role in ("tool", "function"):
        return f"{where}.role", (
            f"{where}: {message.role!r} messages (tool results) need tool calling, which this "
            f"server does not support yet"
        )
    if message.tool_calls:
        return f"{where}.tool_calls", f"{where}.tool_calls: tool calling is not supported by this server yet"
    for part_index, part in enumerate(message.content if isinstance(message.content, list) else ()):
        if part.type != "text":
            return (
                f"{where}.content[{part_index}].type",
                f"{where}.content[{part_index}]: {part.type!r} content parts are not supported: this model "
                f"reads text only",
            )
        if part.text is None:
            return f"{where}.content[{part_index}].text", f"{where}.content[{part_index}]: a text part needs text"
    return None


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description=f"one prompt, or up to {limits.MAX_PROMPTS}, as text or token ids"
    )
    # 0 with echo scores the prompt without generating (the legacy way to ask for prompt logprobs).
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, description="refused when not empty: insertion is not supported")
    best_of: int | None = Field(None, ge=1, le=limits.MAX_N, description="only equal to n (or absent)")

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        if len(prompt) > limits.MAX_PROMPTS:
            raise ValueError(f"prompt: at most {limits.MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        if len(prompt) * self.n > limits.MAX_CHOICES:
            raise ValueError(
                f"prompt: {len(prompt)} prompts times n={self.n} make {len(prompt) * self.n} "
                f"completions; at most {limits.MAX_CHOICES} in one request"
            )
        return list(prompt)

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", _not_supported("suffix (insertion)")
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", _not_supported(f"best_of={self.best_of} other than n={self.n}")
        return super().unsupported()

    def scores_only(self) -> bool:
        """``max_tokens: 0`` with ``echo``: the prompt's logprobs, nothing generated."""
        return self.max_tokens == 0

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        # echo with logprobs returns the prompt's tokens and logprobs too, so the engine computes them.
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

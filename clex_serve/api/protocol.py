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
from clex_serve.api.protocol_structured import (
    MAX_TOOLS,
    ResponseFormat,
    StructuredOutputsRequest,
    Tool,
    ToolChoice,
    check_tools,
)
from clex_serve.engine.input_processor import check_unicode
from clex_serve.sampling_params import RequestOutputKind, SamplingParams
from clex_serve.structured_outputs import StructuredOutputsParams


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
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older name of structured_outputs.json")
    guided_regex: str | None = Field(None, description="vLLM's older name of structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name of structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="vLLM's older name of structured_outputs.grammar")

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, message) for the first parameter that asks for what this server cannot do."""
        return None

    def output_constraint(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """What the output must match, and the parameter that asked (to name in errors); ValueError when
        two parameters ask, or one asks for something malformed."""
        asked = []
        if self.response_format is not None and self.response_format.type != "text":
            asked.append(("response_format", self.response_format.to_params))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", self.structured_outputs.to_params))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                asked.append((name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
        if self.guided_choice is not None:
            asked.append(("guided_choice", lambda: StructuredOutputsParams(choice=tuple(self.guided_choice))))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise ValueError(f"{asked[0][0]}: {asked[0][0]} and {asked[1][0]} both constrain the output; give one")
        param, build = asked[0]
        try:
            return build(), param
        except ValueError as error:
            raise ValueError(f"{param}: {error}") from None

    def parsed_logit_bias(self) -> dict[int, float]:
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():  # OpenAI's keys are token ids written as strings
                raise ValueError(f"logit_bias: key {key!r} is not a token id (a non-negative integer)")
            biases[int(key)] = bias
        return biases

    def _sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured_outputs: StructuredOutputsParams | None = None,
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
            structured_outputs=structured_outputs,
        )


class ContentPart(OpenAIModel):
    type: str = Field(description='only "text": this server\'s models read text')
    text: Text | None = None


class ToolCallFunction(OpenAIModel):
    name: str
    arguments: str = Field("", description="JSON text")


class ChatToolCall(OpenAIModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = None

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
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(None, description='"none", "auto" (the default with tools), "required"')
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = Field(None, description="refused: the deprecated form of tools")
    function_call: Any = Field(None, description='only "none"; the deprecated form of tool_choice')
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
        if self.functions:
            return "functions", _not_supported("the deprecated functions (send them as tools)")
        if self.function_call not in (None, "none"):
            return "function_call", _not_supported("the deprecated function_call (use tool_choice)")
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

    def tool_choice_name(self) -> str:
        """ "none", "auto", "required" or the name of the function to call; ValueError (naming the
        parameter) for a choice the tools cannot meet."""
        tools = self.tools or []
        check_tools(tools)
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if not isinstance(choice, str):
            names = [tool.function.name for tool in tools]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: names the function {choice.function.name!r}, which is not in tools "
                    f"({', '.join(names) or 'none given'})"
                )
            return choice.function.name
        if choice == "required" and not tools:
            raise ValueError('tool_choice: "required" needs tools')
        return choice

    def to_sampling_params(
        self, max_tokens: int, structured_outputs: StructuredOutputsParams | None = None
    ) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, structured_outputs=structured_outputs)


def _unsupported_in_message(index: int, message: ChatMessage) -> tuple[str, str] | None:
    where = f"messages[{index}]"
    if message.role == "function":
        return f"{where}.role", f"{where}: 'function' messages are the deprecated form of 'tool' messages"
    if message.tool_calls and message.role != "assistant":
        return f"{where}.tool_calls", f"{where}: only assistant messages carry tool_calls"
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
        return None

    def scores_only(self) -> bool:
        """``max_tokens: 0`` with ``echo``: the prompt's logprobs, nothing generated."""
        return self.max_tokens == 0

    def to_sampling_params(
        self, max_tokens: int, structured_outputs: StructuredOutputsParams | None = None
    ) -> SamplingParams:
        # echo with logprobs returns the prompt's tokens and logprobs too, so the engine computes them.
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs, structured_outputs)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="rendered with the messages")
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

"""What every route handler shares: the model and engine checks, refusal of what the server does not
implement, output budgets, engine errors as HTTP errors, and the request log line."""

from __future__ import annotations

import logging
import time

from clex_serve.api.context_overflow import context_overflow, overflow_of
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.metrics import ServerMetrics
from clex_serve.api.tool_parsers import DEFAULT_TOOL_CALL_PARSER, tool_call_parser
from clex_serve.engine.async_engine import AsyncLLMEngine
from clex_serve.engine.errors import EngineDeadError, EngineShutdownError, QueueFullError
from clex_serve.engine.input_processor import ProcessedPrompt, PromptTooLongError
from clex_serve.engine.outputs import RequestOutput
from clex_serve.engine.structured.compiler import GrammarError
from clex_serve.sampling_params import SamplingParams

logger = logging.getLogger("clex_serve.api")


class ServingContext:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str,
        chat_template: str | None,
        metrics: ServerMetrics,
        tool_parser_name: str = DEFAULT_TOOL_CALL_PARSER,
    ) -> None:
        self.engine = engine
        self.tool_parser = tool_call_parser(tool_parser_name)
        self.served_model_name = served_model_name
        self.chat_template = chat_template
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.family = engine.model_config.family

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.served_model_name}`",
                param="model",
                code="model_not_found",
            )

    def check_engine(self) -> None:
        if self.engine.dead:
            raise APIError(503, "the engine stopped after an error; restart the server", code="engine_dead")

    def check_request(self, body, request_id: str) -> None:
        """What every generation request passes first: the model, the engine, parameters this server does not
        implement (refused, naming them), and fields the API does not have (ignored, with one log line)."""
        self.check_model(body.model)
        self.check_engine()
        refused = body.unsupported()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        unknown = body.unknown_fields()
        if unknown:
            logger.info("request %s: ignoring fields that are not part of the API: %s", request_id, ", ".join(unknown))

    def output_budget(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        """The output budget: what was asked, or the rest of the context; a prompt and budget that do not fit
        the context are refused in one shape, naming the prompt (or the messages) and both numbers."""
        room = self.max_model_len - prompt_len
        asked = requested if requested is not None else 1
        if asked > room:
            raise context_overflow(self.max_model_len, prompt_len, asked, prompt_param, requested is not None)
        return requested if requested is not None else room

    async def process(self, prompt, params: SamplingParams, constraint_param: str | None) -> ProcessedPrompt:
        """The prompt checked and its output constraint compiled (off the event loop): a constraint that does
        not compile is a 400 naming the parameter that gave it."""
        try:
            return await self.engine.process_inputs(prompt, params)
        except GrammarError as error:
            raise APIError(400, f"{constraint_param}: {error}", param=constraint_param) from None
        except Exception as error:
            raise self.engine_error(error) from None

    async def compile(self, params: SamplingParams, constraint_param: str | None) -> None:
        """Compile the output constraint of ``params`` off the event loop (a 400 naming the parameter when it
        does not compile), so that checking the requests that carry it finds it compiled."""
        try:
            await self.engine.compile_grammar(params)
        except GrammarError as error:
            raise APIError(400, f"{constraint_param}: {error}", param=constraint_param) from None

    @staticmethod
    def engine_error(error: Exception) -> APIError:
        """Any error met while serving a request, as the HTTP error it answers with."""
        if isinstance(error, APIError):
            return error
        if isinstance(error, QueueFullError):
            return APIError(429, str(error), code="queue_full", headers={"Retry-After": "1"})
        if isinstance(error, (EngineDeadError, EngineShutdownError)):
            return APIError(503, str(error), code="engine_unavailable")
        if isinstance(error, PromptTooLongError):
            return overflow_of(error, "prompt")
        if isinstance(error, ValueError):
            return invalid(error)
        return APIError(500, f"generation failed: {error}", code="generation_failed")

    def log(
        self,
        request_id: str,
        status: int,
        prompt_tokens: int,
        output_tokens: int,
        time_to_first_token: float | None,
        started: float,
    ) -> None:
        ttft = f"{time_to_first_token * 1000:.0f}ms" if time_to_first_token is not None else "-"
        logger.info(
            "request %s status %d prompt_tokens %d output_tokens %d ttft %s duration %.0fms",
            request_id,
            status,
            prompt_tokens,
            output_tokens,
            ttft,
            (time.monotonic() - started) * 1000,
        )


def prompt_logprobs_json(ctx: ServingContext, output: RequestOutput) -> list | None:
    """vLLM's ``prompt_logprobs`` field: per prompt position (the first has none), token id -> logprob."""
    if output.prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": ctx.tokenizer.decode([token_id])}
            for token_id, lp in entry.items()
        }
        for entry in output.prompt_logprobs
    ]

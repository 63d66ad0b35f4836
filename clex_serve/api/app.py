"""The FastAPI app: routes, API-key check, CORS, request ids, and every error in the OpenAI shape."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import clex_serve
from clex_serve.api import openapi
from clex_serve.api.body_limit import BodyLimitMiddleware
from clex_serve.api.chat_tools import ChatTools
from clex_serve.api.errors import APIError, invalid, validation_error
from clex_serve.api.limits import default_max_body_bytes
from clex_serve.api.metrics import ServerMetrics
from clex_serve.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from clex_serve.api.protocol_responses import ResponsesRequest
from clex_serve.api.request_ids import RequestIdMiddleware
from clex_serve.api.responses import (
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponseObject,
    TokenizeResponse,
    TokenizerInfo,
    Version,
)
from clex_serve.api.serving import ServingContext
from clex_serve.api.serving_chat import create_chat_completion, render_prompt
from clex_serve.api.serving_completion import create_completion
from clex_serve.api.serving_responses import create_response
from clex_serve.api.tokenizer_info import tokenizer_info
from clex_serve.api.tool_parsers import DEFAULT_TOOL_CALL_PARSER
from clex_serve.engine.async_engine import AsyncLLMEngine

_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    chat_template: str | None = None,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    max_request_body_bytes: int | None = None,
    tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER,
) -> FastAPI:
    app = FastAPI(title="clex-serve", version=clex_serve.__version__)
    openapi.install(app)
    metrics = ServerMetrics(engine)
    ctx = ServingContext(engine, served_model_name, chat_template, metrics, tool_call_parser)
    app.state.ctx = ctx
    body_limit = max_request_body_bytes or default_max_body_bytes(ctx.max_model_len)
    app.add_middleware(BodyLimitMiddleware, max_bytes=body_limit)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, CORS preflights too, carries the id

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    # ---------------------------------------------------------------- errors, all in the OpenAI shape

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status == 429:
            metrics.request_ended("refused")
        elif error.status < 500:
            metrics.request_ended("invalid")
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, error: RequestValidationError):
        metrics.request_ended("invalid")
        return validation_error(list(error.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # Starlette's own errors (404 route, 405 method with its Allow header, 413 body limit) keep their
        # headers and gain the OpenAI body.
        return APIError(
            error.status_code, str(error.detail), code=getattr(error, "code", None), headers=dict(error.headers or {})
        ).response()

    # ---------------------------------------------------------------- routes

    @app.get("/health", response_class=PlainTextResponse, responses={200: _TEXT, **openapi.error_responses(503)})
    async def health():
        if engine.dead or not engine.running:
            return APIError(503, "the engine is not running", code="engine_dead").response()
        return PlainTextResponse("ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: _TEXT})
    async def metrics_route():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", response_model=Version)
    async def version():
        return {"version": clex_serve.__version__}

    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name, root=str(engine.model_path), max_model_len=ctx.max_model_len)

    @app.get(
        "/v1/models",
        dependencies=[Depends(check_key)],
        response_model=ModelList,
        responses=openapi.error_responses(401),
    )
    async def models():
        return ModelList(data=[model_card()])

    @app.get(
        "/v1/models/{model_id:path}",
        dependencies=[Depends(check_key)],
        response_model=ModelCard,
        responses=openapi.error_responses(401, 404),
    )
    async def model(model_id: str):
        ctx.check_model(model_id)
        return model_card()

    @app.get(
        "/tokenizer_info",
        dependencies=[Depends(check_key)],
        response_model=TokenizerInfo,
        responses=openapi.error_responses(401),
    )
    async def tokenizer_info_route():
        return tokenizer_info(ctx.tokenizer, engine.model_config.vocab_size, ctx.max_model_len, ctx.chat_template)

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(check_key)],
        responses={**openapi.streaming_response(ChatCompletion), **openapi.GENERATION_ERRORS},
    )
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request):
        return await create_chat_completion(ctx, body, raw_request, f"chatcmpl-{raw_request.state.request_id}")

    @app.post(
        "/v1/completions",
        dependencies=[Depends(check_key)],
        responses={**openapi.streaming_response(Completion), **openapi.GENERATION_ERRORS},
    )
    async def completions(body: CompletionRequest, raw_request: Request):
        return await create_completion(ctx, body, raw_request, f"cmpl-{raw_request.state.request_id}")

    @app.post(
        "/v1/responses",
        dependencies=[Depends(check_key)],
        responses={**openapi.streaming_response(ResponseObject), **openapi.GENERATION_ERRORS},
    )
    async def responses(body: ResponsesRequest, raw_request: Request):
        return await create_response(ctx, body, raw_request, f"resp_{raw_request.state.request_id}")

    @app.post(
        "/tokenize", dependencies=[Depends(check_key)], response_model=TokenizeResponse, responses=openapi.BODY_ERRORS
    )
    @app.post("/v1/tokenize", dependencies=[Depends(check_key)], include_in_schema=False)
    async def tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages, not both", param="prompt")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
            refused = chat.unsupported()
            if refused:
                raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
            try:
                tools = ChatTools.of(chat, ctx.tool_parser)
            except ValueError as error:
                raise invalid(error) from None
            tokens = (await render_prompt(ctx, chat, tools, body.add_generation_prompt))["prompt_token_ids"]
        else:
            tokens = await asyncio.to_thread(
                ctx.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens
            )
        return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len}

    @app.post(
        "/detokenize",
        dependencies=[Depends(check_key)],
        response_model=DetokenizeResponse,
        responses=openapi.BODY_ERRORS,
    )
    @app.post("/v1/detokenize", dependencies=[Depends(check_key)], include_in_schema=False)
    async def detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(ValueError(f"tokens: {bad} is not in the vocabulary [0, {vocab})"))
        return {"prompt": await asyncio.to_thread(ctx.tokenizer.decode, body.tokens)}

    return app

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
from clex_serve.api.errors import APIError, invalid
from clex_serve.api.metrics import ServerMetrics
from clex_serve.api.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList, TokenizeRequest,
)
from clex_serve.api.request_ids import RequestIdMiddleware
from clex_serve.api.serving import ServingContext
from clex_serve.api.serving_chat import create_chat_completion
from clex_serve.api.serving_completion import create_completion
from clex_serve.engine.async_engine import AsyncLLMEngine
from clex_serve.text.chat_template import chat_prompt

def build_app(engine: AsyncLLMEngine, served_model_name: str, chat_template: str | None = None,
              api_key: str | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="clex-serve", version=clex_serve.__version__)
    metrics = ServerMetrics(engine)
    ctx = ServingContext(engine, served_model_name, chat_template, metrics)
    app.state.ctx = ctx
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, CORS preflights too, carries the id

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    # ---------------------------------------------------------------- errors, all in the OpenAI shape

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status == 429:
            metrics.request_ended("refused")
        elif error.status < 500:
            metrics.request_ended("invalid")
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            param = None
            message = f"the body is not valid JSON: {first.get('msg', '')}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        metrics.request_ended("invalid")
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail)).response()

    # ---------------------------------------------------------------- routes

    @app.get("/health")
    async def health():
        if engine.dead or not engine.running:
            return APIError(503, "the engine is not running", code="engine_dead").response()
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": clex_serve.__version__}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = ModelCard(id=served_model_name, root=str(engine.engine.model_path), max_model_len=ctx.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request):
        return await create_chat_completion(ctx, body, raw_request, f"chatcmpl-{raw_request.state.request_id}")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, raw_request: Request):
        return await create_completion(ctx, body, raw_request, f"cmpl-{raw_request.state.request_id}")

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    @app.post("/v1/tokenize", dependencies=[Depends(check_key)], include_in_schema=False)
    async def tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            if ctx.chat_template is None:
                raise APIError(400, "this model has no chat template", param="messages", code="no_chat_template")
            conversation = ChatCompletionRequest(messages=body.messages).conversation()
            tokens = (await asyncio.to_thread(chat_prompt, ctx.tokenizer, conversation, ctx.family,
                                              body.add_generation_prompt, ctx.chat_template))["prompt_token_ids"]
        else:
            tokens = await asyncio.to_thread(ctx.tokenizer.encode, body.prompt,
                                             add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    @app.post("/v1/detokenize", dependencies=[Depends(check_key)], include_in_schema=False)
    async def detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        vocab = engine.engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(ValueError(f"tokens: {bad} is not in the vocabulary [0, {vocab})"))
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    return app


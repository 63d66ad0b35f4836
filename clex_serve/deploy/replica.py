"""One engine replica on Ray Serve: the engine that ``clex-serve`` would start from the same flags, and the
single server's app in front of it, called in process for each forwarded request.

Ray calls ``record_routing_stats`` periodically (the router reads the answer as the replica's
``routing_stats``) and ``check_health``, which fails once the engine is dead, so that Ray replaces the replica.
"""

from __future__ import annotations

import logging

from ray import serve

from clex_serve.deploy.forwarding import ForwardedRequest, call_app
from clex_serve.deploy.routing_hint import scale_steps

logger = logging.getLogger("clex_serve.deploy")


def parse_serve_flags(flags: list[str]):
    """The ``clex-serve serve`` flags, checked by the command's own parser (so a bad value is refused with
    the same message, naming the flag)."""
    from clex_serve.cli.main import build_parser

    parser = build_parser()
    return parser.parse_args(["serve", *flags])


class EngineReplica:
    def __init__(self, flags: list[str]) -> None:
        import os

        from clex_serve.api.app import build_app
        from clex_serve.cli.engine_start import start_engine
        from clex_serve.cli.main import DEMO_MODEL_NAME
        from clex_serve.engine.async_engine import AsyncLLMEngine
        from clex_serve.text.chat_template import resolve_chat_template

        args = parse_serve_flags(flags)
        self.args = args
        self.engine = AsyncLLMEngine(start_engine(args, "clex-serve"))
        self.served_model_name = args.served_model_name or args.model or DEMO_MODEL_NAME
        self.chat_template = resolve_chat_template(self.engine.tokenizer, args.model or "", args.chat_template)
        origins = [origin.strip() for origin in args.allowed_origins.split(",") if origin.strip()]
        api_key = args.api_key or os.environ.get("CLEX_SERVE_API_KEY") or None
        extra = {"tool_call_parser": args.tool_call_parser} if hasattr(args, "tool_call_parser") else {}
        self.app = build_app(
            self.engine,
            self.served_model_name,
            self.chat_template,
            api_key,
            origins,
            args.max_request_body_bytes,
            **extra,
        )
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        logging.getLogger("clex_serve.api").setLevel(logging.INFO)

    async def handle(self, request: ForwardedRequest):
        """The request through the app: its response as batches of ASGI messages."""
        async for messages in call_app(self.app, request, self.replica_id):
            yield messages

    def describe(self) -> dict:
        """What the ingress needs to compute routing hints without loading the model."""
        engine = self.engine.engine
        return {
            "tokenizer": self.engine.tokenizer,
            "chat_template": self.chat_template,
            "family": self.engine.model_config.family,
            "block_size": engine.block_manager.block_size,
            "max_model_len": self.engine.max_model_len,
            "max_prompt_chars": engine.inputs.max_prompt_chars,
            "applies_log_scale": self.engine.model_config.applies_log_scale,
            "scale_steps": scale_steps(self.engine.scale_for_length, self.engine.max_model_len),
            "prefix_caching": engine.block_manager.enable_prefix_caching,
        }

    def record_routing_stats(self) -> dict:
        stats = self.engine.stats()
        return {
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "unfinished_requests": stats.num_unfinished_requests,
            "kv_blocks": stats.num_kv_blocks,
            "kv_cache_usage": stats.kv_cache_usage,
            "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
            "prefix_cache_queried_tokens": stats.prefix_cache_queried_tokens,
        }

    def check_health(self) -> None:
        if self.engine.dead or not self.engine.running:
            raise RuntimeError("the engine is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

"""Run the app under uvicorn on sockets bound beforehand: say where it listens once they are open, stop
gracefully on SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets requests in flight finish for
``graceful_timeout`` seconds; requests still running then are cancelled, which aborts them in the engine;
then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import uvicorn
from sse_starlette.sse import AppStatus

from clex_serve.api.app import build_app
from clex_serve.engine.async_engine import AsyncLLMEngine


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, announcement: str) -> None:
        super().__init__(config)
        self.announcement = announcement

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            # uvicorn re-raises captured signals after its graceful stop; a SIGTERM that was honoured in
            # full is a clean exit, status 0.
            self._captured_signals.remove(sig)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.announcement, flush=True)


def serve(
    engine: AsyncLLMEngine,
    served_model_name: str,
    sockets: list[socket.socket],
    chat_template: str | None,
    api_key: str | None,
    allowed_origins: list[str] | None,
    log_level: str,
    graceful_timeout: float,
    ui: bool = False,
    max_request_body_bytes: int | None = None,
    tool_call_parser: str = "hermes",
) -> int:
    """``sockets``: bound, not yet listening (``clex_serve.cli.listen_sockets``); uvicorn listens on them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # sse-starlette ends every stream as soon as uvicorn is asked to stop; streams in flight should finish
    # instead, within uvicorn's grace period (after it, uvicorn cancels them, which aborts their requests).
    AppStatus.disable_automatic_graceful_drain()
    app = build_app(
        engine,
        served_model_name,
        chat_template,
        api_key,
        allowed_origins,
        max_request_body_bytes,
        tool_call_parser=tool_call_parser,
    )
    host, port = sockets[0].getsockname()[:2]  # the real port, also for --port 0
    shown_host = f"[{host}]" if ":" in host else host
    announcement = f"clex-serve: serving {served_model_name} at http://{shown_host}:{port}/v1"
    if ui:
        app = _mount_ui(app, served_model_name, api_key)
        announcement += f", web UI at http://{shown_host}:{port}/ui"
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, access_log=False)
    server = _AnnouncingServer(config, announcement)
    try:
        server.run(sockets=sockets)
    finally:
        engine.shutdown()
    return 0 if server.started else 1


def _mount_ui(app, served_model_name: str, api_key: str | None):
    """The Gradio demo at /ui, answering from this server's own engine; with an API key, its login page asks
    for that key as the password (any user name)."""
    from clex_serve.web import INSTALL_HINT

    try:
        import gradio as gr
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    from clex_serve.chat import EngineSource
    from clex_serve.web.app import build_demo

    ctx = app.state.ctx
    demo = build_demo(
        EngineSource(ctx.engine, ctx.chat_template, served_model_name), f"clex-serve · {served_model_name}"
    )
    auth = (lambda user, password: password == api_key) if api_key else None
    return gr.mount_gradio_app(
        app,
        demo.queue(),
        path="/ui",
        ssr_mode=False,
        show_error=False,
        auth=auth,
        auth_message="The API key is the password." if api_key else None,
    )

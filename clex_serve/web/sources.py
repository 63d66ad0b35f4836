"""What ``clex-serve --ui`` (``api/server.py``) builds the web demo's source from: the server's own engine and
chat template, through the chat source every front end shares. It goes once the server builds
``clex_serve.chat.EngineSource`` itself."""

from clex_serve.chat import EngineSource as _EngineSource


def EngineSource(ctx) -> _EngineSource:  # the name server.py imports
    return _EngineSource(ctx.engine, ctx.chat_template, ctx.served_model_name)

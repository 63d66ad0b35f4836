"""Where a chat's answers come from, for the terminal chat and the web demo alike: the engine in this process
(``EngineSource``) or any OpenAI-compatible server (``OpenAISource``), behind one async interface
(``ChatSource``); ``SyncChatSource`` runs one on its own event-loop thread for synchronous callers."""

from clex_serve.chat.engine_source import EngineSource
from clex_serve.chat.openai_source import OpenAISource
from clex_serve.chat.source import ChatSource, ChatSourceError
from clex_serve.chat.sync_source import SyncChatSource

__all__ = ["ChatSource", "ChatSourceError", "EngineSource", "OpenAISource", "SyncChatSource"]

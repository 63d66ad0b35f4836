from clex_serve.attention.metadata import AttentionMetadata
from clex_serve.attention.selector import get_attention_backend

__all__ = ["AttentionMetadata", "get_attention_backend"]

from clex_serve.models.registry import build_model

__all__ = ["build_model"]

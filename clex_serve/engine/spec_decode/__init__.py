"""Speculative decoding by prompt lookup: drafts proposed in the core, verified by the worker in one forward,
exact under CLEX (a draft never crosses a scale boundary) and for sampling (rejection sampling)."""

from clex_serve.engine.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]

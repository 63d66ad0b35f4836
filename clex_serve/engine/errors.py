"""The engine's own error types, so that a server can map each to its status (429, 503)."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows: try again later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """A step failed in a way that leaves the engine unusable; it refuses every request (HTTP 503)."""


class EngineShutdownError(RuntimeError):
    """The engine was shut down while the request was pending, or before it was submitted."""

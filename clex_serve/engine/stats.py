"""A snapshot of the engine's load, for metrics endpoints and admission control."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences waiting for admission (new, or preempted)
    num_unfinished_requests: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int  # since the engine started
    prefix_cache_hit_blocks: int
    prefix_cache_hit_tokens: int
    prefix_cache_queried_tokens: int = 0
    # Speculative decoding: tokens drafted and verified, those accepted, and the verifications (one
    # sequence's drafts in one step), since the engine started.
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_drafted_tokens if self.spec_drafted_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verification yields on average: its accepted drafts and the one token after them."""
        return 1 + self.spec_accepted_tokens / self.spec_verifications if self.spec_verifications else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens if self.prefix_cache_queried_tokens else 0.0
        )

    @property
    def num_used_kv_blocks(self) -> int:
        return self.num_kv_blocks - self.num_free_kv_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0

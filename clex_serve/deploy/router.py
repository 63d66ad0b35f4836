"""The CLEX-scale-aware request router, on Ray Serve's ``RequestRouter`` interface.

A request goes to the replica holding the longest prefix of its prompt that the replica can reuse at the
scale the prompt will run at (the engine's prefix cache keys blocks on that scale, so a prefix computed under
another scale is worth nothing); to the least loaded replica when none holds one, or when load is too uneven
(as SGLang's cache-aware router and Ray's prefix-affinity router fall back). ``key_on_scale=False`` gives
the text-only affinity the others implement (the same tree on token blocks alone), for comparison.

Ray builds this router in each process that holds a handle to the engine deployment (here, the ingress),
calls ``choose_replicas`` for every request, takes replicas rank by rank (the first with room in its
``max_ongoing_requests`` wins) and calls ``on_request_routed`` with the one it picked.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from clex_serve.deploy.forwarding import ForwardedRequest
from clex_serve.deploy.prefix_tree import ScaleKeyedPrefixTree

logger = logging.getLogger("clex_serve.deploy")


def forwarded_request(pending_request: PendingRequest | None) -> ForwardedRequest | None:
    if pending_request is None:
        return None
    return next((arg for arg in pending_request.args if isinstance(arg, ForwardedRequest)), None)


def pinned_replicas(candidates: list[RunningReplica], forwarded: ForwardedRequest | None) -> list[RunningReplica]:
    """The replica a request is pinned to (the ingress's scrape of each replica's /metrics, or a client's
    ``x-clex-replica`` header), where it is still there."""
    if forwarded is None or forwarded.pinned_replica is None:
        return []
    return [r for r in candidates if r.replica_id.unique_id == forwarded.pinned_replica]


def is_imbalanced(loads: list[float], abs_threshold: float, rel_threshold: float) -> bool:
    """SGLang's rule: the busiest replica has more than ``abs_threshold`` requests above the idlest, and more
    than ``rel_threshold`` times as many."""
    if len(loads) < 2:
        return False
    high, low = max(loads), min(loads)
    return high - low > abs_threshold and high > rel_threshold * low


class ClexScaleAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self,
        key_on_scale: bool = True,
        match_rate_threshold: float = 0.1,
        imbalance_abs_threshold: float = 8,
        imbalance_rel_threshold: float = 1.5,
        max_blocks_per_replica: int = 65536,
        **_: Any,
    ) -> None:
        self.key_on_scale = key_on_scale
        self.match_rate_threshold = match_rate_threshold
        self.imbalance_abs_threshold = imbalance_abs_threshold
        self.imbalance_rel_threshold = imbalance_rel_threshold
        self.tree = ScaleKeyedPrefixTree(max_blocks_per_replica)
        self.decisions = {"prefix": 0, "least_loaded": 0, "imbalanced": 0, "pinned": 0}
        from clex_serve.deploy import live_routers  # at run time: see live_routers

        live_routers.ROUTERS[self._deployment_id.name] = self

    # ---------------------------------------------------------------- load

    def load_of(self, replica: RunningReplica) -> float:
        """Requests on the replica: Ray's count of those it sent (kept as they start and end), else what
        the replica last reported."""
        queued = self._replica_queue_len_cache.get(replica.replica_id)
        if queued is not None:
            return queued
        stats = replica.routing_stats or {}
        return stats.get("unfinished_requests", 0)

    def _by_load(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        def key(replica):
            stats = replica.routing_stats or {}
            return (self.load_of(replica), stats.get("kv_cache_usage", 0.0), replica.replica_id.unique_id)

        return sorted(replicas, key=key)

    # ---------------------------------------------------------------- Ray's interface

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        forwarded = forwarded_request(pending_request)
        pinned = pinned_replicas(candidate_replicas, forwarded)
        if pinned:
            self.decisions["pinned"] += 1
            return [pinned]
        ranked = self._by_load(candidate_replicas)
        hint = forwarded.hint if forwarded is not None else None
        if hint is None or not hint.block_hashes:
            return [[replica] for replica in ranked]
        self._refresh_capacities(candidate_replicas)
        if is_imbalanced(
            [self.load_of(r) for r in candidate_replicas], self.imbalance_abs_threshold, self.imbalance_rel_threshold
        ):
            self.decisions["imbalanced"] += 1
            return [[replica] for replica in ranked]
        match = self.tree.match(self._bucket(hint), list(hint.block_hashes), [r.replica_id.unique_id for r in ranked])
        if match.blocks and match.blocks >= self.match_rate_threshold * len(hint.block_hashes):
            self.decisions["prefix"] += 1
            holders = [r for r in ranked if r.replica_id.unique_id in match.replicas]
            others = [r for r in ranked if r.replica_id.unique_id not in match.replicas]
            return [[replica] for replica in holders + others]
        self.decisions["least_loaded"] += 1
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        forwarded = forwarded_request(pending_request)
        if forwarded is not None and forwarded.hint is not None:
            hint = forwarded.hint
            self.tree.insert(self._bucket(hint), list(hint.block_hashes), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.tree.remove_replica(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        for gone in before - {r.unique_id for r in self._replica_id_set}:
            self.tree.remove_replica(gone)

    # ---------------------------------------------------------------- helpers

    def _bucket(self, hint):
        return hint.bucket if self.key_on_scale else None

    def _refresh_capacities(self, replicas: list[RunningReplica]) -> None:
        for replica in replicas:
            blocks = (replica.routing_stats or {}).get("kv_blocks")
            if blocks:
                self.tree.set_capacity(replica.replica_id.unique_id, blocks)

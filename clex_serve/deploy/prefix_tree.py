"""Which replica holds which prompt blocks, per scale bucket: the router's picture of the replicas' prefix
caches.

The engine reuses a cached block only when it was computed under the scale (and, with ``log_scale``, the
length) that a fresh prefill of the new prompt uses, and it keys its blocks on a chain of hashes of
``block_size`` tokens each. This tree mirrors exactly that: one root per scale bucket, one node per chained
block hash, each node remembering which replicas computed it and when they last did. A prefix that some
replica holds under another scale is, for this request, no prefix at all.

Plain Python (no Ray), bounded: each replica keeps at most ``max_blocks_per_replica`` nodes (set from its
KV cache's size, since it cannot hold more), its least recently used ones going first.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


def chained_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The hashes of a prompt's full blocks that the engine could reuse: it leaves at least one prompt token to
    compute (its logits), so a prompt of P tokens has ``(P - 1) // block_size`` of them. Each hash covers its
    block and every block before it."""
    hashes, previous = [], 0
    for index in range((len(token_ids) - 1) // block_size):
        previous = hash((previous, tuple(token_ids[index * block_size : (index + 1) * block_size])))
        hashes.append(previous)
    return hashes


@dataclass
class _Node:
    parent: _Node | None
    key: int | None
    children: dict[int, _Node] = field(default_factory=dict)
    holders: dict[str, float] = field(default_factory=dict)  # replica -> when it last computed this block


@dataclass(frozen=True)
class PrefixMatch:
    replicas: tuple[str, ...]  # the candidates that hold the longest reusable prefix (empty: none)
    blocks: int  # how many blocks of the prompt they hold


class ScaleKeyedPrefixTree:
    def __init__(self, max_blocks_per_replica: int = 65536, clock=time.monotonic) -> None:
        self.max_blocks_per_replica = max_blocks_per_replica
        self._roots: dict[Hashable, _Node] = {}
        self._nodes_of: dict[str, set[int]] = {}  # replica -> ids of the nodes it holds
        self._by_id: dict[int, _Node] = {}
        self._limits: dict[str, int] = {}
        self._clock = clock

    # ---------------------------------------------------------------- queries

    def match(self, bucket: Hashable, block_hashes: list[int], candidates: Iterable[str]) -> PrefixMatch:
        """The candidates holding the most leading blocks of the prompt under ``bucket``."""
        holders = set(candidates)
        node = self._roots.get(bucket)
        depth, best = 0, ()
        if node is None:
            return PrefixMatch((), 0)
        for block_hash in block_hashes:
            node = node.children.get(block_hash)
            if node is None:
                break
            still = holders & node.holders.keys()
            if not still:
                break
            holders, depth, best = still, depth + 1, tuple(sorted(still))
        return PrefixMatch(best, depth)

    def blocks_held(self, replica: str) -> int:
        return len(self._nodes_of.get(replica, ()))

    # ---------------------------------------------------------------- updates

    def insert(self, bucket: Hashable, block_hashes: list[int], replica: str) -> None:
        """``replica`` is computing (or reusing) these blocks under ``bucket`` now."""
        if not block_hashes:
            return
        now = self._clock()
        node = self._roots.setdefault(bucket, _Node(None, None))
        held = self._nodes_of.setdefault(replica, set())
        for block_hash in block_hashes:
            child = node.children.get(block_hash)
            if child is None:
                child = node.children[block_hash] = _Node(node, block_hash)
                self._by_id[id(child)] = child
            child.holders[replica] = now
            held.add(id(child))
            node = child
        limit = self._limits.get(replica, self.max_blocks_per_replica)
        if len(held) > limit:
            self._evict(replica, len(held) - limit)

    def set_capacity(self, replica: str, num_blocks: int) -> None:
        """What the replica's KV cache holds at most (its routing stats say): older entries beyond it go."""
        self._limits[replica] = max(1, num_blocks)
        held = self._nodes_of.get(replica, ())
        if len(held) > self._limits[replica]:
            self._evict(replica, len(held) - self._limits[replica])

    def remove_replica(self, replica: str) -> None:
        """A replica that died (its cache went with it) or left."""
        for node_id in self._nodes_of.pop(replica, set()):
            node = self._by_id.get(node_id)
            if node is not None:
                node.holders.pop(replica, None)
                self._prune(node)
        self._limits.pop(replica, None)

    def _evict(self, replica: str, count: int) -> None:
        # Oldest first; a block is never used without the blocks before it, so children (touched at the same
        # time as their parents, or later) go no later than their parents on ties: deeper first.
        held = self._nodes_of[replica]
        nodes = sorted((self._by_id[node_id] for node_id in held), key=lambda n: (n.holders[replica], -_depth(n)))
        for node in nodes[:count]:
            node.holders.pop(replica, None)
            held.discard(id(node))
            self._prune(node)

    def _prune(self, node: _Node) -> None:
        """Drop nodes that nobody holds and that lead nowhere."""
        while node.parent is not None and not node.holders and not node.children:
            del node.parent.children[node.key]
            self._by_id.pop(id(node), None)
            node = node.parent
        if node.parent is None and not node.children:
            for bucket, root in list(self._roots.items()):
                if root is node:
                    del self._roots[bucket]


def _depth(node: _Node) -> int:
    depth = 0
    while node.parent is not None:
        depth, node = depth + 1, node.parent
    return depth

"""Prompt lookup drafts: the tokens that followed the latest earlier occurrence of the sequence's suffix.

For each n in ``prompt_lookup_min..prompt_lookup_max`` a sequence keeps a map from every n-gram of its
tokens to where its latest occurrence ended, extended by the tokens added since the last look-up. So a
proposal costs a few dictionary look-ups, whatever the length of the context: a scan of 3,000 tokens per
stream per step would cost more than the forward pass it is meant to save. Longer matches are tried first
(they predict better). Only accepted tokens ever enter a sequence, so the index never holds a rejected draft.
Plain Python, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _NgramIndex:
    # n -> n-gram -> the position just after its latest occurrence that has a token after it.
    ends: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    indexed_until: int = 0  # occurrences ending at or before this position are in ``ends``


class NgramProposer:
    def __init__(self, lookup_min: int, lookup_max: int) -> None:
        if not 1 <= lookup_min <= lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lookup_min}, {lookup_max}")
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        self._indexes: dict[int, _NgramIndex] = {}

    def propose(self, seq_id: int, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that may follow ``token_ids``, or none where its suffix is new."""
        if max_tokens < 1:
            return []
        index = self._indexes.setdefault(seq_id, _NgramIndex())
        length = len(token_ids)
        if length < index.indexed_until:  # tokens were taken back (a stop string): start over
            index = self._indexes[seq_id] = _NgramIndex()
        # Occurrences ending before the last position have a continuation; the suffix itself does not.
        for end in range(max(index.indexed_until + 1, self.lookup_min), length):
            for n in range(self.lookup_min, min(self.lookup_max, end) + 1):
                index.ends.setdefault(n, {})[tuple(token_ids[end - n : end])] = end
        index.indexed_until = max(index.indexed_until, length - 1)
        for n in range(min(self.lookup_max, length - 1), self.lookup_min - 1, -1):
            end = index.ends.get(n, {}).get(tuple(token_ids[length - n :]))
            if end is not None:
                return token_ids[end : end + max_tokens]
        return []

    def release(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)

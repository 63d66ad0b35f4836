"""One sequence's place in its grammar: which tokens may come next, advanced with each token it accepts.

Each of a request's ``n`` sequences has its own matcher over the request's one compiled grammar. The
matcher moves only with tokens the sequence keeps (``Scheduler.update_from_output``); a recompute after
preemption replays cached tokens, not output, so it leaves the matcher where it is.
"""

from __future__ import annotations


class SequenceGrammar:
    def __init__(self, compiled_grammar) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled_grammar)

    def fill_mask(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, one bit per token)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; True when the output is complete (the grammar accepted a stop token, or
        the token was not one it allows, which the mask makes impossible but must still end the sequence
        rather than leave it unconstrained)."""
        if not self.matcher.accept_token(token_id):
            return True
        return self.matcher.is_terminated()

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    # ------------------------------------------------------------------ speculative decoding

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of ``token_ids`` (a draft) the grammar accepts in order from here; the matcher is left
        where it was."""
        accepted = 0
        for token_id in token_ids:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token_id):
                break
            accepted += 1
        if accepted:
            self.matcher.rollback(accepted)
        return accepted

    def fill_masks_along(self, bitmask, token_ids: list[int]) -> None:
        """Rows ``0 .. len(token_ids)`` of ``bitmask``: the tokens allowed after each prefix of a draft the
        grammar accepts whole (``valid_prefix``); the matcher is left where it was."""
        for row in range(len(token_ids) + 1):
            if self.matcher.is_terminated():
                # After a draft's stop token the output has ended; the rows left are never kept.
                bitmask[row : len(token_ids) + 1] = -1
                break
            self.matcher.fill_next_token_bitmask(bitmask, row)
            if row < len(token_ids):
                self.matcher.accept_token(token_ids[row])
        if token_ids:
            self.matcher.rollback(len(token_ids))

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

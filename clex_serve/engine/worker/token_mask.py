"""The token mask of structured outputs: each constrained row's logits keep only the tokens its grammar
allows next (the others become -inf), before temperature, top-k/p and sampling.

One int32 bitmask for the batch (a bit per vocabulary entry, xgrammar's layout), filled on the host by
each row's matcher and applied by xgrammar's kernel for the logits' device (C++ on the CPU, CUDA or Triton
on a GPU). Rows without a grammar are not touched. Applied to the logits the decode graph returned, as
vLLM does: the graph's replay stays the same for constrained and free batches.
"""

from __future__ import annotations

import torch

from clex_serve.engine.core.sequence import Sequence


class TokenMasks:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        # pinned for a GPU, so that the copy to it does not wait for the host
        self.pin = torch.device(device).type == "cuda"
        self._bitmask: torch.Tensor | None = None  # reused across steps; grows to the largest batch seen

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Mask ``logits`` [B, vocab] in place for the rows whose sequence has a grammar."""
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return
        import xgrammar

        bitmask = self._bitmask_for(len(seqs), xgrammar)
        for row in rows:
            seqs[row].grammar.fill_mask(bitmask, row)
        bitmask = bitmask[: len(seqs)]
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)

    def apply_along_draft(self, logits: torch.Tensor, seq: Sequence, draft_token_ids: list[int]) -> None:
        """Mask the rows of a verify chunk in place: row ``j`` keeps what the grammar allows after the
        sequence's tokens and the first ``j`` drafts (``logits`` [len(drafts) + 1, vocab])."""
        if seq.grammar is None:
            return
        import xgrammar

        rows = len(draft_token_ids) + 1
        bitmask = self._bitmask_for(rows, xgrammar)
        seq.grammar.fill_masks_along(bitmask, draft_token_ids)
        bitmask = bitmask[:rows]
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)

    def _bitmask_for(self, batch: int, xgrammar) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < batch:
            self._bitmask = xgrammar.allocate_token_bitmask(batch, self.vocab_size)
            if self.pin:
                self._bitmask = self._bitmask.pin_memory()
        return self._bitmask

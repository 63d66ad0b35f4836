"""The token mask of structured outputs: each constrained row's logits keep only the tokens its grammar
allows next (the others become -inf), last before temperature, top-k/p and sampling.

One int32 bitmask for the batch (a bit per vocabulary entry, xgrammar's layout), filled on the host by each
row's matcher (10-100 us a row) and applied on the CPU by our C++ kernel (0.06 ms for 16 rows of 32,000,
where xgrammar's CPU kernel took 1-2 ms), on a GPU by xgrammar's CUDA or Triton kernel, to the logits the
decode graph returned (as vLLM does: the graph's replay is the same for constrained and free batches).
Rows without a grammar are not touched.

The masks need only the tokens so far, so on a GPU they are filled beside the step's forward pass, in a
thread of their own (xgrammar releases the GIL). Not on the CPU: there the filling thread took cores from
the forward (16 streams: the forward 7% slower, where filling inline costs 4% of the step).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from clex_serve.engine.core.sequence import Sequence
from clex_serve.kernels import cpu_ops


class TokenMasks:
    def __init__(self, vocab_size: int, device: torch.device, cpu_kernels: bool = False) -> None:
        self.vocab_size = vocab_size
        self.cpu_kernels = cpu_kernels
        # a GPU: the host bitmask pinned, so that its copy does not wait, and filled beside the forward
        self.pin = self.overlap = torch.device(device).type == "cuda"
        self._bitmask: torch.Tensor | None = None  # reused across steps; grows to the largest batch seen
        self._draft_bitmask: torch.Tensor | None = None  # a verify chunk's rows
        self._filler: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple[int, ...], Future] | None = None

    def fill_ahead(self, seqs: list[Sequence]) -> None:
        """Start filling the masks of the rows ``apply`` will be given, while the caller runs the forward."""
        if not self.overlap or not any(seq.grammar is not None for seq in seqs):
            return
        import xgrammar

        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="token-masks")
        bitmask = self._bitmask_for(len(seqs), xgrammar)
        key = tuple(seq.seq_id for seq in seqs)
        self._pending = (key, self._filler.submit(self._fill, bitmask, list(seqs)))

    @staticmethod
    def _fill(bitmask: torch.Tensor, seqs: list[Sequence]) -> None:
        # One row after another: xgrammar's BatchGrammarMatcher on two threads filled 16 rows in 0.61 ms
        # against 0.64 here, not worth a thread pool of its own.
        for row, seq in enumerate(seqs):
            if seq.grammar is not None:
                seq.grammar.fill_mask(bitmask, row)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Mask ``logits`` [B, vocab] in place for the rows whose sequence has a grammar."""
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return
        import xgrammar

        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == tuple(seq.seq_id for seq in seqs):
            pending[1].result()  # filled beside the forward pass
        else:
            if pending is not None:
                pending[1].result()  # never two fills of the one buffer at once
            self._fill(self._bitmask_for(len(seqs), xgrammar), seqs)
        self._apply(logits, self._bitmask[: len(seqs)], rows, xgrammar)

    def apply_along_draft(self, logits: torch.Tensor, seq: Sequence, draft_token_ids: list[int]) -> None:
        """Mask the rows of a verify chunk in place: row ``j`` keeps what the grammar allows after the
        sequence's tokens and the first ``j`` drafts (``logits`` [len(drafts) + 1, vocab])."""
        if seq.grammar is None:
            return
        import xgrammar

        rows = len(draft_token_ids) + 1
        # A buffer of its own: the plain rows' masks may be being filled beside the forward pass.
        if self._draft_bitmask is None or self._draft_bitmask.shape[0] < rows:
            self._draft_bitmask = xgrammar.allocate_token_bitmask(rows, self.vocab_size)
        seq.grammar.fill_masks_along(self._draft_bitmask, draft_token_ids)
        self._apply(logits, self._draft_bitmask[:rows], list(range(rows)), xgrammar)

    def _apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], xgrammar) -> None:
        if self.cpu_kernels and logits.dtype == torch.float32 and logits.is_contiguous():
            cpu_ops.apply_token_bitmask(logits, bitmask, rows)
            return
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)

    def _bitmask_for(self, batch: int, xgrammar) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < batch:
            self._bitmask = xgrammar.allocate_token_bitmask(batch, self.vocab_size)
            if self.pin:
                self._bitmask = self._bitmask.pin_memory()
        return self._bitmask

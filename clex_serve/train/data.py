"""Token streams: the corpus split tokenized once, documents joined by ``</s>``, cut into training windows.

Batches are a pure function of the step (an epoch-seeded permutation of the windows), so a resumed run reads
exactly the batches the uninterrupted run would have read, with no loader state to save.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from clex_serve.train.corpus import SourceFile


def tokenize_files(tokenizer: Tokenizer, files: Iterable[SourceFile], eos_id: int) -> torch.Tensor:
    """One int32 stream: each file's tokens (no bos: windows start mid-document anyway) followed by eos."""
    ids: list[int] = []
    for source in files:
        ids.extend(tokenizer.encode(source.read(), add_special_tokens=False).ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def load_or_tokenize(cache: Path, tokenizer: Tokenizer, files: list[SourceFile], eos_id: int) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache)
    stream = tokenize_files(tokenizer, files, eos_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stream, cache)
    return stream


class WindowSampler:
    """Non-overlapping windows of ``seq_len`` tokens, in a fresh seeded order every epoch."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.num_windows = stream.numel() // seq_len
        if self.num_windows < batch_size:
            raise ValueError(
                f"the stream has {self.num_windows} windows of {seq_len} tokens, fewer than "
                f"one batch of {batch_size}; use more text or a smaller batch"
            )
        self.windows = stream[: self.num_windows * seq_len].view(self.num_windows, seq_len).long()
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        """[batch_size, seq_len] token ids of step ``step`` (0-based)."""
        per_epoch = self.num_windows // self.batch_size
        epoch, index = divmod(step, per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=generator)
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.windows[rows]

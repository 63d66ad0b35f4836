"""Held-out perplexity at a given context length, with logits from the clex-serve engine (not transformers).

The same tokens are scored at every length: the first ``num_tokens`` of the held-out stream, cut into
windows of ``length`` tokens. Each window is one prefill (one pass, so CLEX rotates it with ``t(length)``)
and every position except the first predicts its next token; the perplexity is ``exp`` of the mean negative
log-likelihood over all windows' predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
from clex_serve.loading.loader import load_model

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Method:
    """A model folder plus the ``rope_scaling`` to run it with at a length ``L`` (None: the folder's own)."""

    name: str
    model_path: Path
    scaling: str | None = None  # None, "linear", "dynamic" or "yarn"

    def config_overrides(self, length: int, base_len: int) -> dict | None:
        factor = max(length / base_len, 1.0)
        if self.scaling is None:
            return None
        if self.scaling == "linear":
            return {"rope_scaling": {"type": "linear", "factor": factor}}
        if self.scaling == "dynamic":
            # transformers' dynamic NTK with its documented example factor 2: it grows the base only past L0.
            return {"rope_scaling": {"type": "dynamic", "factor": 2.0}}
        if self.scaling == "yarn":
            return {"rope_scaling": {"type": "yarn", "factor": factor, "original_max_position_embeddings": base_len}}
        raise ValueError(f"unknown scaling {self.scaling!r}; use linear, dynamic or yarn")


def window_nll(runner: ModelRunner, window: list[int]) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predictions) for one window in one pass."""
    num_blocks = math.ceil(len(window) / runner.block_size)
    step = SequenceStep(
        token_ids=window,
        num_cached=0,
        block_table=list(range(num_blocks)),
        all_logits=True,
        scale=runner.rope.scale_for_length(len(window)),
    )
    logits = runner.execute([step]).all_logits[0]
    targets = torch.tensor(window[1:], device=logits.device)
    nll = F.cross_entropy(logits[:-1].float(), targets, reduction="sum")
    return float(nll), len(window) - 1


def perplexity(method: Method, tokens: torch.Tensor, length: int, base_len: int, dtype: str = "float32") -> float:
    if tokens.numel() < length:
        raise ValueError(f"{tokens.numel()} held-out tokens are fewer than one window of {length}")
    loaded = load_model(
        method.model_path,
        dtype=dtype,
        device="cpu",
        show_progress=False,
        config_overrides=method.config_overrides(length, base_len),
    )
    runner = ModelRunner(loaded, num_blocks=math.ceil(length / BLOCK_SIZE), block_size=BLOCK_SIZE)
    total, count = 0.0, 0
    for start in range(0, tokens.numel() - length + 1, length):
        nll, n = window_nll(runner, tokens[start : start + length].tolist())
        total, count = total + nll, count + n
    return math.exp(total / count)

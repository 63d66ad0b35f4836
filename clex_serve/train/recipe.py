"""The settings of the shipped demo model, in one place, so that a retrain reproduces it.

The schedule is sized for one CPU thread: CLEX pretraining pays for an ODE solve (and its backward) every
step, ~0.2 s per unit of ``t``, so the batch is large enough to amortise it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clex_serve.train.model import ModelShape
from clex_serve.train.trainer import TrainConfig

MAX_FACTOR = 16  # CLEX's T: the context limit is base_len * MAX_FACTOR = 2048
VOCAB_SIZE = 4096


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape = field(default_factory=lambda: ModelShape(vocab_size=VOCAB_SIZE))
    batch_size: int = 32  # windows of shape.base_len tokens per pretraining step
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=750, learning_rate=3e-3, warmup_steps=40, max_factor=MAX_FACTOR, seed=0, checkpoint_every=50))
    sft_batch_size: int = 32  # chat examples per fine-tuning step
    sft_lm_batch_size: int = 16  # pretraining windows mixed into each fine-tuning step (keeps CLEX trained)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=150, learning_rate=1e-3, warmup_steps=10, max_factor=MAX_FACTOR, seed=1, checkpoint_every=50))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.sft_batch_size < 1 or self.sft_lm_batch_size < 0:
            raise ValueError("batch sizes must be positive (sft_lm_batch_size may be 0)")
        if self.pretrain.max_factor != self.sft.max_factor:
            raise ValueError("pretraining and fine-tuning must use the same CLEX max_factor")

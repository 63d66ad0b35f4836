"""The settings of the shipped demo model, in one place, so that a retrain reproduces it.

As in the CLEX paper, CLEX is a fine-tune of a model pretrained with plain RoPE: a tiny model trained from
scratch on CLEX's sparse positions learns local structure far more slowly (loss 6.5 against 5.3 for plain
RoPE after 120 steps here), because the gap between neighbouring tokens is random at every scale t > 1.
The plain-RoPE model is thus both the starting point and the baseline of the evaluation.

The schedule is sized for one CPU thread: CLEX steps pay for an ODE solve and its backward (~0.1-0.2 s per
unit of ``t``), so the batch is large enough to amortise it.
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
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=750, learning_rate=3e-3, warmup_steps=40, max_factor=MAX_FACTOR, seed=0, checkpoint_every=50
        )
    )
    # CLEX continued pretraining of the plain model: t drawn from 1..T and sparse positions every step.
    clex: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300,
            learning_rate=1e-3,
            warmup_steps=20,
            max_factor=MAX_FACTOR,
            seed=2,
            checkpoint_every=25,
            ode_lr_ratio=0.01,
        )
    )
    sft_batch_size: int = 32  # chat examples per fine-tuning step
    sft_lm_batch_size: int = 16  # pretraining windows mixed into each fine-tuning step (keeps CLEX trained)
    sft: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=150,
            learning_rate=1e-3,
            warmup_steps=10,
            max_factor=MAX_FACTOR,
            seed=1,
            checkpoint_every=25,
            ode_lr_ratio=0.01,
        )
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.sft_batch_size < 1 or self.sft_lm_batch_size < 0:
            raise ValueError("batch sizes must be positive (sft_lm_batch_size may be 0)")
        if self.clex.max_factor != self.sft.max_factor:
            raise ValueError("CLEX training and the chat fine-tune must use the same max_factor")

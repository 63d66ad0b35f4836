"""The training loop shared by pretraining and the chat fine-tune: seeded, resumable, with a progress bar.

A checkpoint holds the model, the optimizer, the step and every random state, and batches are a function
of the step, so stopping and resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clex_serve.train.model import rotary_of
from clex_serve.train.positions import draw_scale, fractional_positions

MAX_BAD_STEPS = 10


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine schedule ends at learning_rate * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_factor: int = 16  # T: CLEX scales are drawn from 1..T (ignored without CLEX)
    seed: int = 0
    checkpoint_every: int = 100
    # The CLEX projection learns at this fraction of the learning rate. The ODE integrates its output over up
    # to T - 1 time units, so at the transformer's rate it diverged within 50 steps (frequencies of e^37 at
    # t = 16, then NaN); the official fine-tunes use ~1e-5 for all weights.
    ode_lr_ratio: float = 0.002

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("learning_rate must be positive and min_lr_ratio in [0, 1]")
        if not 0 < self.ode_lr_ratio <= 1:
            raise ValueError(f"ode_lr_ratio must be in (0, 1], got {self.ode_lr_ratio}")
        if self.warmup_steps < 0 or self.checkpoint_every < 1 or self.max_factor < 1:
            raise ValueError("warmup_steps must be >= 0, checkpoint_every and max_factor >= 1")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, N]
    labels: torch.Tensor  # [B, N]; -100 where no loss is taken (transformers shifts them itself)
    clex_sampling: bool  # rotate with a drawn scale and fractional positions (CLEX pretraining)


BatchFn = Callable[[int], list[Batch]]  # step -> the batches whose mean loss that step minimises


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only; norms and the CLEX projection (initialised to exact NTK behaviour) are not pulled to 0.
    decay, no_decay, ode = [], [], []
    for name, param in model.named_parameters():
        if "proj_func" in name:
            ode.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr_ratio": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_ratio": 1.0},
    ]
    if ode:
        groups.append({"params": ode, "weight_decay": 0.0, "lr_ratio": config.ode_lr_ratio})
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)


class Trainer:
    def __init__(
        self,
        model,
        config: TrainConfig,
        batches: BatchFn,
        checkpoint_path: Path,
        use_clex: bool,
        base_len: int,
        log=None,
    ) -> None:
        self.model = model
        self.config = config
        self.batches = batches
        self.checkpoint_path = Path(checkpoint_path)
        self.use_clex = use_clex
        self.base_len = base_len
        self.optimizer = make_optimizer(model, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.bad_steps = 0
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint_path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.checkpoint_path)  # a crash mid-save leaves the previous checkpoint intact

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return True

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        seq_len = batch.input_ids.shape[1]
        scale = 1
        if batch.clex_sampling and self.use_clex:
            scale = draw_scale(self.config.max_factor, self.generator)
            positions = fractional_positions(seq_len, self.base_len, scale, self.generator)
        else:
            positions = torch.arange(seq_len, dtype=torch.float32)
        rotary_of(self.model).set_step(positions, scale)
        return self.model(input_ids=batch.input_ids, labels=batch.labels).loss, scale

    def train_step(self) -> tuple[float, list[int]]:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.step) * group.get("lr_ratio", 1.0)
        batches = self.batches(self.step)
        total, scales = 0.0, []
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            loss, scale = self._loss(batch)
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
            scales.append(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if math.isfinite(total) and torch.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:  # one odd batch must not poison the weights; a run that keeps failing must stop
            self.bad_steps += 1
            self.log(f"step {self.step}: non-finite loss or gradient at scales {scales}, update skipped")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"{MAX_BAD_STEPS} non-finite steps in a row; lower the learning rate "
                    "(or ode_lr_ratio) and resume from the last checkpoint"
                )
        self.step += 1
        return total, scales

    def _ode_summary(self) -> str:
        """How far the learned frequencies at the largest scale moved from CLEX's NTK starting point."""
        rotary = rotary_of(self.model)
        if not self.use_clex or rotary.proj_func is None:
            return ""
        with torch.no_grad():
            rotary.set_step(torch.zeros(1), self.config.max_factor)
            log_freq = torch.log(rotary.scaled_inv_freq())
        return f" | log inv_freq at t={self.config.max_factor}: [{log_freq.min():.2f}, {log_freq.max():.2f}]"

    def run(self, desc: str = "train") -> None:
        resumed = self.load_checkpoint()
        if resumed:
            self.log(f"{desc}: resumed at step {self.step}/{self.config.steps}")
        start = time.time()
        recent: list[float] = []
        with tqdm(
            total=self.config.steps, initial=self.step, desc=desc, file=sys.stderr, mininterval=20, dynamic_ncols=True
        ) as progress:
            while self.step < self.config.steps:
                loss, scales = self.train_step()
                recent.append(loss)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", t=scales[-1], refresh=False)  # keeps logs short
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.save_checkpoint()
                    self.log(
                        f"{desc}: step {self.step} mean loss {sum(recent) / len(recent):.4f} "
                        f"lr {self.config.lr_at(self.step - 1):.2e} elapsed {time.time() - start:.0f}s"
                        + self._ode_summary()
                    )
                    recent = []

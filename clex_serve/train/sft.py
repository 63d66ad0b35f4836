"""Stage 3: a short chat fine-tune of the pretrained CLEX model, so that it answers in the Vicuna format.

Each step averages two losses: one on a batch of chat examples (loss on the assistant tokens and the closing
``</s>`` only, at scale 1 since the examples are short), and one on pretraining windows with CLEX's scale and
position sampling, so that fine-tuning at short lengths does not unlearn the long ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from clex_serve.train.corpus import split_files
from clex_serve.train.data import WindowSampler
from clex_serve.train.instructions import InstructionPair, instruction_pairs
from clex_serve.train.model import ModelShape
from clex_serve.train.tokenizer import BOS, EOS, VICUNA_SYSTEM
from clex_serve.train.trainer import Batch, TrainConfig, Trainer

IGNORE_INDEX = -100
MIN_ANSWER_TOKENS = 8  # an example whose prompt leaves less room than this teaches nothing; it is dropped


def chat_prompt(question: str) -> str:
    """What the tokenizer's chat template renders for one user turn with ``add_generation_prompt``."""
    return f"{BOS}{VICUNA_SYSTEM} USER: {question} ASSISTANT:"


def encode_example(tokenizer: Tokenizer, pair: InstructionPair, max_len: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels): labels are the ids on the answer and its ``</s>``, IGNORE_INDEX on the prompt.
    Answers are cut to fit ``max_len``; None when the prompt alone leaves no room for an answer."""
    prompt = tokenizer.encode(chat_prompt(pair.question), add_special_tokens=False).ids
    if len(prompt) + MIN_ANSWER_TOKENS > max_len:
        return None
    answer = tokenizer.encode(" " + pair.answer, add_special_tokens=False).ids
    answer = answer[: max_len - len(prompt) - 1] + [tokenizer.token_to_id(EOS)]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


class ChatBatches:
    """Fixed-size, right-padded batches of chat examples, in a seeded order per epoch."""

    def __init__(
        self, tokenizer: Tokenizer, pairs: list[InstructionPair], batch_size: int, max_len: int, seed: int
    ) -> None:
        encoded = [example for example in (encode_example(tokenizer, pair, max_len) for pair in pairs) if example]
        if len(encoded) < batch_size:
            raise ValueError(f"only {len(encoded)} chat examples for a batch of {batch_size}")
        pad = tokenizer.token_to_id(EOS)
        # Padding goes at the end and carries no loss; causal attention never lets real tokens see it.
        self.ids = torch.full((len(encoded), max_len), pad, dtype=torch.long)
        self.labels = torch.full((len(encoded), max_len), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, labels) in enumerate(encoded):
            self.ids[row, : len(ids)] = torch.tensor(ids)
            self.labels[row, : len(labels)] = torch.tensor(labels)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> Batch:
        per_epoch = self.ids.shape[0] // self.batch_size
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(self.ids.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return Batch(self.ids[rows], self.labels[rows], clex_sampling=False)


def finetune(
    model,
    shape: ModelShape,
    tokenizer: Tokenizer,
    train_stream: torch.Tensor,
    config: TrainConfig,
    batch_size: int,
    lm_batch_size: int,
    checkpoint_path: Path,
    use_clex: bool = True,
) -> None:
    train_files, _ = split_files()
    chats = ChatBatches(tokenizer, instruction_pairs(train_files), batch_size, shape.base_len, config.seed)
    windows = WindowSampler(train_stream, shape.base_len, lm_batch_size, config.seed) if lm_batch_size else None

    def batches(step: int) -> list[Batch]:
        chat = [chats.batch(step)]
        if windows is None:
            return chat
        ids = windows.batch(step)
        return chat + [Batch(ids, ids, clex_sampling=True)]

    Trainer(model, config, batches, checkpoint_path, use_clex, shape.base_len).run(desc="chat-finetune")

"""Stage 1: train the tokenizer on the training split and tokenize both splits, once per run folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from clex_serve.train.corpus import split_files
from clex_serve.train.data import load_or_tokenize
from clex_serve.train.tokenizer import EOS, load_tokenizer, save_hf_tokenizer, train_tokenizer


def tokenizer_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tokenizer"


def prepare(run_dir: Path, vocab_size: int, model_max_length: int) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """(tokenizer, training token stream, held-out token stream), reusing what ``run_dir`` already has."""
    run_dir = Path(run_dir)
    train_files, held_out_files = split_files()
    folder = tokenizer_dir(run_dir)
    if not (folder / "tokenizer.json").exists():
        tokenizer = train_tokenizer((source.read() for source in train_files), vocab_size)
        save_hf_tokenizer(tokenizer, folder, model_max_length)
    tokenizer = load_tokenizer(folder)
    eos_id = tokenizer.token_to_id(EOS)
    train = load_or_tokenize(run_dir / "train_tokens.pt", tokenizer, train_files, eos_id)
    held_out = load_or_tokenize(run_dir / "heldout_tokens.pt", tokenizer, held_out_files, eos_id)
    return tokenizer, train, held_out

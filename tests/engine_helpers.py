"""Shared by the engine tests: reference checkpoints with a small tokenizer beside them."""

import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import FIXTURES

TRAINING_TEXT = [
    "CLEX scales rotary frequencies with a learned ODE so that models read far past their training length.",
    "def generate(prompt, max_tokens=16):\n    return engine.run(prompt)  # naïve café, 東京, emoji 🙂",
] * 20


def byte_level_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with <unk>, <s>, </s> at ids 0, 1, 2, as the reference configs expect."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sentencepiece_style_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Llama-style: metaspace (▁) pre-tokenization and byte fallback, as Llama-2's tokenizer.json has."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def model_with_tokenizer(name: str, folder: Path) -> Path:
    folder = Path(folder) / name
    shutil.copytree(FIXTURES / name, folder, ignore=shutil.ignore_patterns("cases.safetensors"))
    byte_level_tokenizer().save_pretrained(folder)
    return folder

"""Shared by the engine tests: reference checkpoints with a small tokenizer beside them."""

import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers.reference import FIXTURES

TRAINING_TEXT = [
    "CLEX scales rotary frequencies with a learned ODE so that models read far past their training length.",
    "def generate(prompt, max_tokens=16):\n    return engine.run(prompt)  # naïve café, 東京, emoji 🙂",
] * 20


def byte_level_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with <unk>, <s>, </s> at ids 0, 1, 2, as the reference configs expect."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def word_level_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Words ``w3 .. w{vocab_size - 1}`` after <unk>, <s>, </s>: every token decodes to visible text, whatever
    a random model writes (a byte-level one can write bytes that never complete a character)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sentencepiece_style_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Llama-style: metaspace (▁) pre-tokenization and byte fallback, as Llama-2's tokenizer.json has."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def model_with_tokenizer(name: str, folder: Path) -> Path:
    folder = Path(folder) / name
    shutil.copytree(FIXTURES / name, folder, ignore=shutil.ignore_patterns("cases.safetensors"))
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def slow_random_llama(folder: Path, hidden: int = 512, layers: int = 8) -> Path:
    """A random plain Llama (about 25M parameters at the defaults) with a word-level tokenizer: slow enough on
    the CPU (several ms a token) that a long answer is still being written while a test acts on it, and every
    token it writes shows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = Path(folder) / "slow_llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    return folder


def batched_decode_logits(runner, tokens: list[int], prompt_lens: list[int], steps: int):
    """Prefill each ``tokens[:p]`` in one step, then decode ``steps`` teacher-forced tokens for all together,
    on interleaved block tables. Returns (logits [steps, sequences, vocab] on the CPU, final scales)."""
    import torch

    from clex_serve.engine.worker.model_runner import SequenceStep

    count = len(prompt_lens)
    tables = [list(range(i, runner.kv_cache.num_blocks, count)) for i in range(count)]
    scales = [runner.rope.scale_for_length(p) for p in prompt_lens]
    runner.execute([SequenceStep(tokens[:p], 0, tables[i], scale=scales[i]) for i, p in enumerate(prompt_lens)])
    lengths, logits = list(prompt_lens), []
    for _ in range(steps):
        new_scales = [runner.rope.scale_for_length(n + 1) for n in lengths]
        result = runner.execute(
            [SequenceStep([tokens[n]], n, tables[i], scales[i], scale=new_scales[i]) for i, n in enumerate(lengths)]
        )
        logits.append(result.last_logits.cpu())
        scales, lengths = new_scales, [n + 1 for n in lengths]
    return torch.stack(logits), scales

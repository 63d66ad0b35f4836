"""The chat fine-tune: a few steps on a tiny model lower the loss on the assistant's answers."""

import pytest
import torch

from clex_serve.train.corpus import list_source_files, split_files
from clex_serve.train.data import tokenize_files
from clex_serve.train.instructions import instruction_pairs
from clex_serve.train.model import ModelShape, build_model
from clex_serve.train.sft import IGNORE_INDEX, ChatBatches, finetune
from clex_serve.train.tokenizer import train_tokenizer
from clex_serve.train.trainer import TrainConfig

# base_len leaves room for the long Vicuna system prompt, which a 512-token vocabulary splits finely.
SHAPE = ModelShape(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, base_len=192)


@pytest.mark.slow
def test_finetune_learns_the_answers(tmp_path):
    torch.set_num_threads(1)
    files = list_source_files()[:8]
    tokenizer = train_tokenizer([f.read() for f in files], SHAPE.vocab_size)
    stream = tokenize_files(tokenizer, files, eos_id=2)
    model = build_model(SHAPE, use_clex=True, seed=0)
    pairs = instruction_pairs(split_files()[0])
    probe = ChatBatches(tokenizer, pairs, 16, SHAPE.base_len, seed=99).batch(0)
    assert (probe.labels != IGNORE_INDEX).any() and (probe.labels == IGNORE_INDEX).any()

    def answer_loss():
        model.eval()
        model.model.rotary_emb.set_step(torch.arange(SHAPE.base_len, dtype=torch.float32), 1)
        with torch.no_grad():
            return model(input_ids=probe.input_ids, labels=probe.labels).loss.item()

    before = answer_loss()
    config = TrainConfig(steps=20, learning_rate=1e-2, warmup_steps=2, max_factor=4, checkpoint_every=20)
    finetune(
        model, SHAPE, tokenizer, stream, config, batch_size=8, lm_batch_size=1, checkpoint_path=tmp_path / "sft.pt"
    )
    assert (tmp_path / "sft.pt").exists()
    assert answer_loss() < before - 0.5  # nats per answer token; it starts near ln(512) = 6.2

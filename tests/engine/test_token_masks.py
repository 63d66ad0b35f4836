"""The sampler's token masks: the masks filled beside the forward pass (the GPU's way) equal the ones filled
inline, a verify chunk's rows follow the grammar along the draft, and rows without a grammar are untouched."""

import torch

from clex_serve.assets import DEFAULT_MODEL_PATH
from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.structured.compiler import GrammarCompiler
from clex_serve.engine.structured.grammar import SequenceGrammar
from clex_serve.engine.worker.token_mask import TokenMasks
from clex_serve.sampling_params import SamplingParams
from clex_serve.structured_outputs import StructuredOutputsParams
from clex_serve.text.tokenizer import load_tokenizer

VOCAB = 4096


def constrained_batch():
    tokenizer = load_tokenizer(DEFAULT_MODEL_PATH)
    grammar = GrammarCompiler(tokenizer, VOCAB, [2]).compile(StructuredOutputsParams(choice=("yes", "no way")))
    seqs = []
    for seq_id, constrained in enumerate([True, False, True]):
        seq = Sequence(seq_id, "r", 0, [1, 5, 6], SamplingParams())
        seq.grammar = SequenceGrammar(grammar) if constrained else None
        seqs.append(seq)
    return tokenizer, seqs


def test_masks_filled_ahead_equal_masks_filled_inline():
    _, seqs = constrained_batch()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    inline, ahead = logits.clone(), logits.clone()
    TokenMasks(VOCAB, torch.device("cpu")).apply(inline, seqs)
    masks = TokenMasks(VOCAB, torch.device("cpu"))
    masks.overlap = True  # as on a GPU
    masks.fill_ahead(seqs)
    masks.apply(ahead, seqs)
    assert torch.equal(inline, ahead)
    assert torch.equal(inline[1], logits[1])  # the free row
    assert 0 < int(torch.isfinite(inline[0]).sum()) < 10
    assert torch.equal(torch.isfinite(inline[0]), torch.isfinite(inline[2]))


def test_a_verify_chunk_is_masked_along_its_draft():
    tokenizer, seqs = constrained_batch()
    draft = tokenizer.encode("no way", add_special_tokens=False)
    logits = torch.zeros(len(draft) + 1, VOCAB)
    TokenMasks(VOCAB, torch.device("cpu")).apply_along_draft(logits, seqs[0], draft)
    for row, token in enumerate(draft):
        assert torch.isfinite(logits[row, token])  # each draft token is allowed where it stands
    assert torch.isfinite(logits[len(draft)]).nonzero().flatten().tolist() == [2]  # then only the end
    assert seqs[0].grammar.valid_prefix(draft) == len(draft)  # and the matcher is back where it was

"""The C++ token-mask kernel of structured outputs against xgrammar's: the same logits become -inf, only in
the rows asked for, for a vocabulary that is not a multiple of 32."""

import pytest
import torch

from clex_serve.kernels.cpu_extension import cpu_kernels_available

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]


@pytest.mark.parametrize("vocab", [4096, 32001])
def test_the_kernel_masks_as_xgrammar_does(vocab):
    import xgrammar

    from clex_serve.kernels import cpu_ops

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator)
    bitmask = xgrammar.allocate_token_bitmask(8, vocab)  # more rows than logits, as the engine's buffer
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=generator, dtype=torch.int32))
    bitmask[3] = -1  # a row that allows everything
    rows = [0, 2, 3, 5]
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask[:6], vocab_size=vocab, indices=rows)
    cpu_ops.apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[0]).any() and not torch.isinf(logits[1]).any() and not torch.isinf(logits[3]).any()


def test_masked_tokens_are_never_sampled():
    from clex_serve.kernels import cpu_ops

    generator = torch.Generator().manual_seed(0)
    logits = torch.full((64, 4096), float("-inf"))
    allowed = torch.randint(0, 4096, (64, 3), generator=generator)
    logits.scatter_(1, allowed, torch.randn(64, 3, generator=generator))
    uniforms = torch.rand(64, generator=generator, dtype=torch.float64)
    uniforms[:4] = torch.tensor([0.0, 1e-12, 1 - 1e-12, 0.5], dtype=torch.float64)
    chosen = cpu_ops.sample_rows(logits, torch.full((64,), 0.7), uniforms)
    assert all(int(token) in row.tolist() for token, row in zip(chosen, allowed))

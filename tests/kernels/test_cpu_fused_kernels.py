"""The C++ CPU kernels against the PyTorch code they replace, with the same roundings to the dtype: the
rotary and cache write bit for bit, RMSNorm and silu to the last bit of the dtype (their float32 sums and
exponentials are ordered and computed differently from PyTorch's vectorised ones)."""

import pytest
import torch

from clex_serve.attention.metadata import AttentionMetadata, flat_slots
from clex_serve.attention.sdpa import rotate_queries_and_keys, write_kv
from clex_serve.kernels import cpu_ops
from clex_serve.kernels.cpu_extension import cpu_kernels_available
from clex_serve.kernels.cpu_layers import CpuRMSNorm
from clex_serve.layers.norm import RMSNorm

pytestmark = [
    pytest.mark.skipif(not cpu_kernels_available(), reason="CPU kernels do not build here"),
    pytest.mark.usefixtures("each_cpu_isa"),
]
DTYPES = [torch.float32, torch.bfloat16]
ONE_STEP = {torch.float32: dict(atol=1e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-2, rtol=2**-7)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 200, generator=generator).to(dtype)
    residual = torch.randn(20, 200, generator=generator).to(dtype)
    norm = RMSNorm(200, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, generator=generator) + 0.5)
        out, total = cpu_ops.rms_norm(x, residual if with_residual else None, norm.weight, 1e-5)
        expected_input = x + residual if with_residual else x
        if with_residual:
            torch.testing.assert_close(total, expected_input, atol=0, rtol=0)
        torch.testing.assert_close(out, norm._normalise(expected_input), **ONE_STEP[dtype])
        # The CPU's layer, which replaces RMSNorm in a CPU model, calls the kernel.
        cpu_norm = CpuRMSNorm.replacing(norm)
        layer_out = cpu_norm(x, residual) if with_residual else cpu_norm(x)
        torch.testing.assert_close(layer_out[0] if with_residual else layer_out, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gate_up = torch.randn(17, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.split(1500, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **ONE_STEP[dtype])


def _metadata(cos, sin, query_scale, slots) -> AttentionMetadata:
    tokens = cos.shape[0]
    return AttentionMetadata(
        positions=torch.arange(tokens),
        slot_mapping=slots,
        cos=cos,
        sin=sin,
        query_scale=query_scale,
        query_lens=[tokens],
        context_lens_host=[tokens],
        context_lens=torch.tensor([tokens], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32),
        block_size=16,
        is_decode=False,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary_dim,log_scale",
    [
        (4, 2, 16, 16, True),  # GQA with the CLEX log scale
        (4, 4, 80, 32, False),  # Phi-2's partial rotary
        (2, 2, 128, 128, True),  # a head of several 16-lane vectors per half
        (2, 1, 40, 24, True),  # a half of 12 channels: a partial vector
    ],
)
def test_rotate_and_cache_equals_the_eager_path(dtype, head_major, heads, kv_heads, head_dim, rotary_dim, log_scale):
    """Queries and keys rotated (queries scaled) as the eager path does, bit for bit; keys and values written
    to their slots of either pool layout, no other slot touched."""
    generator = torch.Generator().manual_seed(2)
    tokens, slots_in_pool = 5, 24
    packed = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    q, k, v = (
        t.reshape(tokens, -1, head_dim)
        for t in packed.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    )
    angles = torch.rand(tokens, rotary_dim // 2, generator=generator) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    query_scale = (torch.rand(tokens, 1, 1, generator=generator) + 1).to(dtype) if log_scale else None
    slots = torch.tensor([3, 9, 10, 0, 17])

    def pool():
        # head-major [H, slots, D] (the CPU's), or paged [blocks, block_size, H, D]
        shape = (kv_heads, slots_in_pool, head_dim) if head_major else (slots_in_pool // 4, 4, kv_heads, head_dim)
        cache = torch.full(shape, 7.0, dtype=dtype)
        return cache, flat_slots(cache)  # the tensor, its [slots, H, D] view

    (k_pool, k_flat), (v_pool, v_flat) = pool(), pool()
    (k_ref_pool, _), (v_ref_pool, _) = pool(), pool()
    meta = _metadata(cos, sin, query_scale, slots)
    q_expected, k_expected = rotate_queries_and_keys(q, k, meta)
    write_kv(k_ref_pool, v_ref_pool, k_expected, v, slots)
    q_out, k_out = cpu_ops.rotate_and_cache(
        q, k, v, cos, sin, query_scale.flatten() if log_scale else None, slots, k_flat, v_flat
    )
    for got, expected in ((q_out, q_expected), (k_out, k_expected), (k_pool, k_ref_pool), (v_pool, v_ref_pool)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_argmax_rows_is_torch_argmax():
    # Ties go to the first index, a NaN wins as in torch.argmax, rows of any length, all -inf.
    x = torch.randn(64, 32000, generator=torch.Generator().manual_seed(4))
    x[3, 100] = x[3, 200] = 50.0
    x[5, 31999] = 60.0
    x[7, 17] = x[7, 30] = float("nan")
    for logits in (x, torch.randn(5, 37), torch.full((2, 20), -float("inf")), torch.randn(3, 1)):
        assert torch.equal(cpu_ops.argmax_rows(logits), logits.argmax(dim=-1))


def test_penalties_kernel_equals_the_pytorch_formulation(monkeypatch):
    """Repetition, presence and frequency penalties in one C++ pass give the PyTorch path's logits bit for bit,
    for a batch mixing rows without penalties, each penalty alone and all together, over two steps."""
    from clex_serve.engine.core.sequence import Sequence
    from clex_serve.engine.worker import penalties as penalties_module
    from clex_serve.sampling_params import SamplingParams

    vocab, generator = 500, torch.Generator().manual_seed(3)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.4),
        SamplingParams(presence_penalty=-0.5),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.2, presence_penalty=0.7),
    ]
    seqs = []
    for index, sampling in enumerate(params):
        seq = Sequence(index, f"r{index}", 0, torch.randint(0, vocab, (30,), generator=generator).tolist(), sampling)
        seq.token_ids += torch.randint(0, vocab, (40,), generator=generator).tolist()  # repeats among them
        seqs.append(seq)
    states = {
        kernel: penalties_module.PenaltyState(vocab, torch.device("cpu"), cpu_kernels=kernel)
        for kernel in (True, False)
    }
    for _ in range(2):
        logits = torch.randn(len(seqs), vocab, generator=generator) * 3
        results = {}
        for kernel, state in states.items():
            results[kernel] = state.apply(logits.clone(), seqs)
            state.record(seqs, torch.randint(0, vocab, (len(seqs),), generator=torch.Generator().manual_seed(5)))
        assert torch.equal(results[True], results[False])
        assert torch.equal(results[True][0], logits[0])  # the row without penalties is untouched
        assert not torch.equal(results[True][1:], logits[1:])

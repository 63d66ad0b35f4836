"""The Triton paged decode kernel and the decode-graph computation, on the CPU through Triton's interpreter
(conftest sets ``TRITON_INTERPRET=1`` where there is no GPU) and compiled on CUDA."""

import pytest
import torch

from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.kernels.device_layers import use_triton_layers
from clex_serve.loading.loader import load_model
from helpers.attention import reference_attention
from helpers.models import batched_decode_logits
from helpers.reference import FIXTURES, reference_cases

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,lengths,window,num_splits",
    [
        (4, 2, 16, 4, [1, 37, 100], None, 4),  # GQA, a split past the end of the short contexts
        (8, 8, 80, 16, [130, 5], None, 8),  # a head dim that is not a power of two (Phi-2's)
        (4, 1, 32, 8, [50, 9], 7, 2),  # sliding window
        (4, 4, 16, 4, [200], None, 1),
    ],
)
def test_paged_decode_matches_float64_attention(heads, kv_heads, head_dim, block_size, lengths, window, num_splits):
    from clex_serve.attention.triton_decode import paged_decode_attention

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    num_blocks = 200
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE, generator=generator)
    q = torch.randn(len(lengths), heads, head_dim, device=DEVICE, generator=generator)
    per_sequence = -(-max(lengths) // block_size)
    order = torch.randperm(num_blocks, device=DEVICE, generator=generator)
    tables = torch.stack([order[i * per_sequence : (i + 1) * per_sequence] for i in range(len(lengths))]).int()
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, num_splits, window)
    expected = reference_attention(q, k_cache, v_cache, tables, lengths, window)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_decode_graph_computation_equals_the_eager_sdpa_path():
    """The graph's buffered computation (scale rows gathered into rotary tables, log scale from context
    lengths, fused norm / rotary / cache-write / activation kernels, Triton decode, a padding row) gives the
    eager SDPA path's logits for three sequences, two of which cross a CLEX scale boundary. On the CPU it
    runs uncaptured, the fused kernels forced on; on CUDA, as captured graphs."""
    name = "llama_logscale"
    tokens = reference_cases(name)["sequence"].tolist()
    loaded = load_model(FIXTURES / name, dtype="float32", device=DEVICE, show_progress=False)
    eager = ModelRunner(loaded, num_blocks=96, block_size=4, attention_backend="sdpa", max_num_seqs=4)
    graphed = ModelRunner(loaded, num_blocks=96, block_size=4, attention_backend="triton", max_num_seqs=4)
    if graphed.decode_graphs is None:
        graphed.enable_decode_graphs(capture=False)

    expected, _ = batched_decode_logits(eager, tokens, [30, 62, 90], steps=5)
    if DEVICE == "cpu":
        use_triton_layers(loaded.model)  # the CUDA path's norm and activation kernels, in Triton's interpreter
    ours, scales = batched_decode_logits(graphed, tokens, [30, 62, 90], steps=5)
    assert scales == [2, 3, 3]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

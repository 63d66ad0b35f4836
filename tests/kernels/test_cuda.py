"""The CUDA path: bfloat16 against the float32 references, CUDA graphs against eager decode, the Triton decode
kernel at real model shapes, and the KV pool sized by profiling. Float32 parity on CUDA is in the parity
tests, parametrized by device. Everything here skips without a CUDA device."""

import pytest
import torch

from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.loading.loader import load_model
from helpers.attention import reference_attention
from helpers.models import batched_decode_logits
from helpers.reference import FIXTURES, REFERENCE_MODELS, SingleSequence, reference_cases, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_bfloat16_greedy_tokens_equal_float32_where_the_margin_exceeds_the_noise(name, reference_runner):
    """Teacher-forced decoding across every scale change in bfloat16 (prefill by SDPA, decode in CUDA graphs,
    eager for Mixtral) against the golden float32 logits. bfloat16's noise is measured as the 90th percentile
    over positions of the largest logit error at a position; wherever the golden top token leads the second
    by more than twice that, bfloat16 must pick the same token. (With the maximum error as the noise the
    check could not fail; with a percentile, the positions of largest error are the ones it tests.)"""
    cases = reference_cases(name)
    tokens = cases["sequence"].tolist()
    prompt_len = min(int(key.rsplit("_", 1)[1]) for key in cases if key.startswith("decode_from_"))
    golden = cases[f"decode_from_{prompt_len}"]
    sequence = SingleSequence(reference_runner(name, device="cuda", dtype="bfloat16"), max_len=128)
    rows = [sequence.feed(tokens[:prompt_len]).last_logits[0].cpu()]
    rows += [sequence.feed([token]).last_logits[0].cpu() for token in tokens[prompt_len:128]]
    ours = torch.stack(rows)
    assert ours.shape == golden.shape and torch.isfinite(ours).all()

    error = (ours - golden).abs().amax(dim=-1)
    noise = error.quantile(0.9).item()
    top2 = golden.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * noise
    agree = ours.argmax(-1) == golden.argmax(-1)
    print(
        f"{name}: bfloat16 noise {noise:.4f} (largest error {error.max():.4f}), {int(decided.sum())} of "
        f"{len(golden)} positions decided, greedy agreement {int(agree.sum())} of {len(golden)} overall"
    )
    assert decided.sum() >= len(golden) // 4, "too few positions are decided to test anything"
    assert agree[decided].all(), (
        f"bfloat16 changes a decided token at positions {(~agree & decided).nonzero().flatten().tolist()}"
    )


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_cuda_graph_decode_equals_eager_decode(dtype, tolerance):
    """Three sequences at different scales run in the graph of batch size 4 (one padding row), across a scale
    change, and give the logits of the same steps run eagerly."""
    name = "llama_logscale"
    tokens = reference_cases(name)["sequence"].tolist()
    loaded = load_model(FIXTURES / name, dtype=dtype, device="cuda", show_progress=False)
    graphed = ModelRunner(loaded, num_blocks=96, block_size=4, max_num_seqs=8)
    eager = ModelRunner(loaded, num_blocks=96, block_size=4, max_num_seqs=8, enforce_eager=True)
    assert graphed.decode_graphs is not None and 4 in graphed.decode_graphs.graphs
    assert eager.decode_graphs is None

    ours, scales = batched_decode_logits(graphed, tokens, [25, 40, 90], steps=12)
    assert scales == [2, 2, 4]  # the first sequence crossed from 1 to 2
    expected, _ = batched_decode_logits(eager, tokens, [25, 40, 90], steps=12)
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("num_splits", [1, 32])
def test_triton_paged_decode_at_model_shapes(window, num_splits):
    """Head dim 128, 32 query heads over 8 KV heads, blocks of 16 scattered over the pool, contexts from 1 to
    5000 tokens, in bfloat16 against float64: relative error at bfloat16's level."""
    from clex_serve.attention.triton_decode import paged_decode_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 17, 1000, 5000]
    block_size, num_blocks = 16, 1024
    k_cache = torch.randn(num_blocks, block_size, 8, 128, device="cuda", generator=generator).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, 8, 128, device="cuda", generator=generator).bfloat16()
    q = torch.randn(len(lengths), 32, 128, device="cuda", generator=generator).bfloat16()
    order = torch.randperm(num_blocks, device="cuda", generator=generator)
    per_sequence = -(-max(lengths) // block_size)  # scattered tables; sequences may share blocks (read only)
    tables = torch.stack([order.roll(i * per_sequence)[:per_sequence] for i in range(len(lengths))]).int()
    context_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, num_splits, window)
    expected = reference_attention(q, k_cache, v_cache, tables, lengths, window)
    error = (out.double() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all() and error < 1e-2, f"relative error {error:.2e}"


def test_kv_pool_sized_by_profiling_leaves_room_for_the_longest_prefill(tmp_path):
    """With a budget tight enough that the pool does not reach its cap, the engine measures the activation
    peak, sizes the pool under --gpu-memory-utilization, and then a prompt of max_num_batched_tokens tokens
    runs with the allocator's peak inside that share of the card."""
    import json

    from clex_serve import LLM, SamplingParams
    from helpers.models import byte_level_tokenizer

    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=320,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
        log_scale=True,
        rope_scaling={"type": "clex", "max_factor": 8, "param_factor": 1, "act": "silu"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    byte_level_tokenizer().save_pretrained(tmp_path)

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # What is in use now, plus about 4 GiB for weights, activations and the pool: the pool must be cut short.
    utilization = (total - free + 4 * 2**30) / total
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(
        str(tmp_path),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_num_seqs=64,
        max_num_batched_tokens=16384,
        gpu_memory_utilization=utilization,
        show_progress=False,
    )
    engine = llm.engine
    cap = 64 * (engine.max_model_len // engine.worker.runner.block_size)
    assert 0 < engine.block_manager.num_blocks < cap

    prompt = {"prompt_token_ids": [3 + i % 300 for i in range(16000)]}
    output = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(output.outputs[0].token_ids) == 8
    free_now, _ = torch.cuda.mem_get_info()
    outside_torch = (total - free_now) - torch.cuda.memory_reserved()  # CUDA context, other processes
    assert torch.cuda.max_memory_reserved() + outside_torch <= utilization * total + 256 * 2**20


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_engine_greedy_generation_on_cuda_matches_golden(enforce_eager, tmp_path):
    """The whole engine (scheduler, graphs or eager decode, sampler) in float32 on CUDA reproduces the golden
    greedy tokens of the official implementation, up to the context limit."""
    from clex_serve import LLM, SamplingParams
    from helpers.models import model_with_tokenizer

    name = "llama_logscale"
    cases = reference_cases(name)
    prompt_len = min(int(key.rsplit("_", 1)[1]) for key in cases if key.startswith("greedy_from_"))
    expected = cases[f"greedy_from_{prompt_len}"].tolist()
    llm = LLM(
        str(model_with_tokenizer(name, tmp_path)),
        dtype="float32",
        device="cuda",
        show_progress=False,
        enforce_eager=enforce_eager,
        kv_cache_memory_gib=0.05,
    )
    assert (llm.engine.worker.runner.decode_graphs is None) == enforce_eager
    prompt = {"prompt_token_ids": cases["sequence"][:prompt_len].tolist()}
    output = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert output.outputs[0].token_ids == expected
    assert output.outputs[0].finish_reason == "length"

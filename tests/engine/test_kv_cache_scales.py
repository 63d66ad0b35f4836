"""The KV cache under CLEX scale changes: one entry per token, re-rotated once per change, never per step."""

import pytest
import torch

import clex_serve.engine.worker.cache_rotation as cache_rotation
from clex_serve.engine.worker.model_runner import ModelRunner
from clex_serve.layers.rotary import apply_rotary
from clex_serve.loading.loader import load_model
from helpers.reference import FIXTURES, SingleSequence, reference_cases


def _runner(name: str, num_blocks: int) -> ModelRunner:
    loaded = load_model(FIXTURES / name, dtype="float32", device="cpu", show_progress=False)
    return ModelRunner(loaded, num_blocks=num_blocks, block_size=8)


def test_cache_holds_one_entry_per_token_at_the_current_scale():
    """A pool of exactly 128 slots carries a sequence from 1 to 128 tokens across t = 1, 2, 3, 4, and afterwards
    every cached layer-0 key equals a fresh rotation of that token's key with the final scale."""
    runner = _runner("llama", num_blocks=16)  # 16 blocks * 8 slots = 128 = the context limit
    assert runner.kv_cache.num_blocks == 16
    assert runner.kv_cache.flat_keys(0).shape[0] == (16 + 1) * 8  # and the padding block, which no sequence uses
    tokens = reference_cases("llama")["sequence"].tolist()
    sequence = SingleSequence(runner, 128)
    sequence.feed(tokens[:5])
    for token in tokens[5:]:
        sequence.feed([token])
    assert sequence.scale == 4

    model = runner.model
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(tokens)))
        _, keys, _ = attention.qkv_proj.forward_split(hidden)
        keys = keys.reshape(128, attention.num_kv_heads, attention.head_dim)
        positions = torch.arange(128)
        cos, sin = runner.rope.cos_sin(positions, runner.rope.inv_freq_for_scale(4)[None])
        expected = apply_rotary(keys, cos, sin)
    slots = [runner.kv_cache.slot(sequence.block_table, p) for p in range(128)]
    cached = runner.kv_cache.flat_keys(0)[slots]
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)


def test_decode_rerotates_once_per_scale_change_and_rotates_only_new_tokens(monkeypatch):
    runner = _runner("phi", num_blocks=16)
    rerotations, rotary_rows = [], []
    original_delta = cache_rotation._delta_rotation
    original_cos_sin = runner.rope.cos_sin

    def counting_delta(positions, old_freq, new_freq):
        rerotations.append(len(positions))
        return original_delta(positions, old_freq, new_freq)

    def recording_cos_sin(positions, inv_freq):
        rotary_rows.append(len(positions))
        return original_cos_sin(positions, inv_freq)

    monkeypatch.setattr(cache_rotation, "_delta_rotation", counting_delta)
    monkeypatch.setattr(runner.rope, "cos_sin", recording_cos_sin)

    tokens = reference_cases("phi")["sequence"].tolist()
    sequence = SingleSequence(runner, 128)
    sequence.feed(tokens[:10])
    for token in tokens[10:]:
        sequence.feed([token])
    # t changes when the length reaches 33, 65 and 97: the cache (32, 64, 96 keys) is re-rotated then only.
    assert rerotations == [32, 64, 96]
    assert rotary_rows == [10] + [1] * (128 - 10)


@pytest.mark.parametrize("head_major", [False, True])
def test_sequences_changing_scale_in_one_step_are_rerotated_together(monkeypatch, head_major):
    """One batched pass for every sequence that crosses a boundary in the step (a delta-rotation table for all
    their keys), equal to re-rotating them one by one, in either pool layout."""
    from clex_serve.engine.worker.kv_cache import KVCachePool

    runner = _runner("llama", num_blocks=16)
    rope = runner.rope
    pool = KVCachePool(
        runner.config,
        num_blocks=16,
        block_size=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        head_major=head_major,
    )
    pool.tensor.normal_(generator=torch.Generator().manual_seed(0))
    jobs = [
        cache_rotation.Rerotation([3, 1, 7], 20, 1, 2),
        cache_rotation.Rerotation([9, 4], 13, 2, 4),
        cache_rotation.Rerotation([12], 5, 3, 3),
    ]  # unchanged scale: left alone
    original = pool.tensor.clone()
    for job in jobs:
        cache_rotation.rerotate_all(pool, rope, [job])
    one_by_one = pool.tensor.clone()
    pool.tensor.copy_(original)
    calls = []
    original_delta = cache_rotation._delta_rotation
    monkeypatch.setattr(cache_rotation, "_delta_rotation", lambda *args: calls.append(1) or original_delta(*args))
    cache_rotation.rerotate_all(pool, rope, jobs)
    assert len(calls) == 1
    torch.testing.assert_close(pool.tensor, one_by_one, atol=1e-6, rtol=0)
    assert not torch.equal(pool.tensor, original)


@pytest.mark.parametrize("head_major", [False, True])
def test_block_copies_and_slots_mean_the_same_in_both_layouts(head_major):
    from clex_serve.engine.worker.kv_cache import KVCachePool

    config = load_model(FIXTURES / "llama", dtype="float32", device="cpu", show_progress=False).config
    pool = KVCachePool(
        config, num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"), head_major=head_major
    )
    pool.tensor.normal_(generator=torch.Generator().manual_seed(0))
    before = [pool.flat_keys(layer).clone() for layer in range(pool.num_layers)]
    values_before = pool.tensor.clone()
    pool.copy_blocks([1, 4], [5, 0])
    for layer in range(pool.num_layers):
        after = pool.flat_keys(layer)
        assert after.shape[1:] == (config.num_key_value_heads, config.head_dim)
        torch.testing.assert_close(after[20:24], before[layer][4:8])  # block 1 -> 5
        torch.testing.assert_close(after[0:4], before[layer][16:20])  # block 4 -> 0
        torch.testing.assert_close(after[4:20], before[layer][4:20])  # the others untouched
    assert not torch.equal(pool.tensor, values_before)

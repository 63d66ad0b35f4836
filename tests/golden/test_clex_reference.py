"""Parity with the official CLEX implementation on its golden outputs (float32, 1e-4 absolute)."""

import pytest
import torch

from clex_serve.config import ModelConfig
from clex_serve.layers.rotary import get_rope
from helpers.reference import DEVICES, FIXTURES, MANIFEST, REFERENCE_MODELS, SingleSequence, reference_cases

TOLERANCE = 1e-4


def _cases(kind: str):
    for name in REFERENCE_MODELS:
        for key in sorted(reference_cases(name)):
            if key.startswith(kind + "_"):
                yield name, int(key.rsplit("_", 1)[1])


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_scaled_inv_freq_matches_ode_solution(name, reference_runner):
    rope = reference_runner(name).rope
    expected = reference_cases(name)["scaled_inv_freq"]
    assert rope.scaled_inv_freq.shape == expected.shape
    torch.testing.assert_close(rope.scaled_inv_freq, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_ode_is_solved_from_the_checkpoint_projection(name):
    """A fresh rope with zero projection is pure NTK scaling, so matching the fixture proves the weights count."""
    config = ModelConfig.from_file(FIXTURES / name / "config.json")
    rope = get_rope(config)
    rope.finalize()
    difference = (rope.scaled_inv_freq[1:] - reference_cases(name)["scaled_inv_freq"][1:]).abs().max()
    assert difference > 1e-4


@pytest.mark.parametrize("layout", ["scattered", "one run"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,length", list(_cases("prefill")))
def test_prefill_logits(name, length, device, layout, reference_runner):
    cases = reference_cases(name)
    sequence = SingleSequence(reference_runner(name, device=device), max_len=128, one_run=layout == "one run")
    result = sequence.feed(cases["sequence"][:length].tolist(), all_logits=True)
    torch.testing.assert_close(result.all_logits[0].cpu(), cases[f"prefill_{length}"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(result.last_logits[0].cpu(), cases[f"prefill_{length}"][-1], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,length", [case for case in _cases("prefill") if "logscale" not in case[0]])
def test_prefill_in_two_chunks_in_one_run(name, length, device, reference_runner):
    """A second chunk attends the first's cached keys and its own in one run (causal from the end): the
    logits of a prefill of the whole, where CLEX makes chunking exact, i.e. the first chunk already at the
    whole's scale (and no log scale, which depends on a pass's length)."""
    runner = reference_runner(name, device=device)
    scale = runner.rope.scale_for_length(length)
    first = max(length // 2, next(n for n in range(1, length + 1) if runner.rope.scale_for_length(n) == scale))
    if first == length:
        pytest.skip(f"no shorter first chunk has the scale of {length} tokens")
    cases = reference_cases(name)
    tokens = cases["sequence"][:length].tolist()
    sequence = SingleSequence(runner, max_len=128, one_run=True)
    sequence.feed(tokens[:first])
    result = sequence.feed(tokens[first:], all_logits=True)
    torch.testing.assert_close(result.all_logits[0].cpu(), cases[f"prefill_{length}"][first:], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,prompt_len", list(_cases("decode_from")))
def test_cached_decode_across_scale_changes(name, prompt_len, device, reference_runner):
    cases = reference_cases(name)
    tokens = cases["sequence"].tolist()
    expected = cases[f"decode_from_{prompt_len}"]
    sequence = SingleSequence(reference_runner(name, device=device), max_len=128)
    logits = [sequence.feed(tokens[:prompt_len]).last_logits[0].cpu()]
    for position in range(prompt_len, 128):
        logits.append(sequence.feed([tokens[position]]).last_logits[0].cpu())
    assert sequence.scale == MANIFEST["models"][name]["max_factor"]  # crossed every boundary
    torch.testing.assert_close(torch.stack(logits), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,prompt_len", list(_cases("greedy_from")))
def test_greedy_generation(name, prompt_len, device, reference_runner):
    cases = reference_cases(name)
    expected = cases[f"greedy_from_{prompt_len}"].tolist()
    sequence = SingleSequence(reference_runner(name, device=device), max_len=128)
    next_logits = sequence.feed(cases["sequence"][:prompt_len].tolist()).last_logits[0]
    generated = []
    while len(generated) < len(expected):
        generated.append(int(next_logits.argmax()))
        if prompt_len + len(generated) < 128:
            next_logits = sequence.feed([generated[-1]]).last_logits[0]
    assert generated == expected


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_sequences_at_different_scales(device, reference_runner):
    """Four prompts at scales 1, 2, 3 and 4 share one prefill step and 25 decode steps; each sequence gets
    the logits it gets alone, and the two with golden references match them. The first crosses from scale 1
    to 2 during the decode steps (on CUDA, between replays of the same captured graph)."""
    from clex_serve.engine.worker.model_runner import ModelRunner, SequenceStep
    from clex_serve.loading.loader import load_model

    name = "llama_logscale"
    cases = reference_cases(name)
    tokens = cases["sequence"].tolist()
    prompt_lens = [19, 37, 70, 100]
    decode_steps = 25
    loaded = load_model(FIXTURES / name, dtype="float32", device=device, show_progress=False)
    runner = ModelRunner(loaded, num_blocks=4 * 32, block_size=4, max_num_seqs=8)
    tables = [list(range(i, 128, 4)) for i in range(4)]  # interleaved blocks

    cache_scales = [runner.rope.scale_for_length(p) for p in prompt_lens]
    steps = [SequenceStep(tokens[:p], 0, tables[i], scale=cache_scales[i]) for i, p in enumerate(prompt_lens)]
    batched = [runner.execute(steps).last_logits.cpu()]
    lengths = list(prompt_lens)
    assert cache_scales == [1, 2, 3, 4]
    for _ in range(decode_steps):
        scales = [runner.rope.scale_for_length(n + 1) for n in lengths]
        steps = [
            SequenceStep([tokens[n]], n, tables[i], cache_scales[i], scale=scales[i]) for i, n in enumerate(lengths)
        ]
        result = runner.execute(steps)
        batched.append(result.last_logits.cpu())
        cache_scales = scales
        lengths = [n + 1 for n in lengths]
    batched = torch.stack(batched, dim=1)  # [sequence, step, vocab]

    for index, prompt_len in enumerate(prompt_lens):
        alone = SingleSequence(reference_runner(name, device=device), max_len=128)
        expected = [alone.feed(tokens[:prompt_len]).last_logits[0].cpu()]
        expected += [alone.feed([tokens[prompt_len + k]]).last_logits[0].cpu() for k in range(decode_steps)]
        torch.testing.assert_close(batched[index], torch.stack(expected), atol=1e-5, rtol=0)
        golden = cases.get(f"decode_from_{prompt_len}")
        if golden is not None:
            torch.testing.assert_close(batched[index], golden[: decode_steps + 1], atol=TOLERANCE, rtol=0)

"""What the synchronous engine hands out: deltas that add up to the whole, stats, the waiting-queue limit,
the engine seed, and text that a finished sequence's detokenizer still held back."""

import pytest
import torch

from clex_serve import LLM, SamplingParams
from clex_serve.engine.errors import QueueFullError
from clex_serve.sampling_params import RequestOutputKind
from clex_serve.text.detokenizer import IncrementalDetokenizer
from helpers.models import byte_level_tokenizer, model_with_tokenizer
from helpers.reference import reference_cases

NAME = "llama"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_with_tokenizer(NAME, tmp_path_factory.mktemp("model"))


def _llm(folder, **kwargs):
    return LLM(str(folder), dtype="float32", device="cpu", show_progress=False, block_size=4, **kwargs)


def _prompt(length):
    return {"prompt_token_ids": reference_cases(NAME)["sequence"][:length].tolist()}


def test_delta_outputs_carry_only_what_is_new(folder):
    engine = _llm(folder).engine
    params = SamplingParams(
        temperature=0, max_tokens=None, ignore_eos=True, logprobs=1, output_kind=RequestOutputKind.DELTA
    )
    engine.add_request(_prompt(7), params, "delta")
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert all(len(output.outputs[0].token_ids) == 1 for output in outputs)
    tokens = [t for output in outputs for t in output.outputs[0].token_ids]
    assert tokens == reference_cases(NAME)["greedy_from_7"].tolist()
    assert "".join(output.outputs[0].text for output in outputs) == engine.tokenizer.decode(tokens)
    assert sum(len(output.outputs[0].logprobs) for output in outputs) == len(tokens)
    final = outputs[-1].metrics
    assert final.num_generation_tokens == len(tokens) and final.time_to_first_token >= final.queue_time >= 0
    assert sum(len(output.metrics.inter_token_times) for output in outputs) == len(tokens) - 1


def test_stats_and_the_waiting_limit(folder):
    engine = _llm(folder, max_queued_requests=2).engine
    engine.add_request(_prompt(7), SamplingParams(max_tokens=3), "a")
    engine.add_request(_prompt(7), SamplingParams(max_tokens=3), "b")
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.add_request(_prompt(7), SamplingParams(max_tokens=3), "c")
    stats = engine.stats()
    assert stats.num_waiting == 2 and stats.num_running == 0 and stats.num_unfinished_requests == 2
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.num_waiting == 0 and stats.num_used_kv_blocks > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks


def test_the_engine_seed_drives_unseeded_sampling(folder):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    first = _llm(folder, seed=7).generate(_prompt(7), params)[0].outputs[0].token_ids
    again = _llm(folder, seed=7).generate(_prompt(7), params)[0].outputs[0].token_ids
    other = _llm(folder, seed=8).generate(_prompt(7), params)[0].outputs[0].token_ids
    assert first == again and first != other


def test_detokenizer_flushes_an_incomplete_character_at_the_end():
    tokenizer = byte_level_tokenizer()
    lead_byte = tokenizer.convert_tokens_to_ids("ð")  # byte 0xF0 in the byte-level alphabet: opens a 4-byte char
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"))
    assert detokenizer.add(lead_byte) == ""  # held back: the character is incomplete
    assert detokenizer.flush() == tokenizer.decode([lead_byte]) == "\ufffd"
    assert detokenizer.flush() == ""


def test_a_finished_sequence_keeps_its_last_incomplete_character(folder, monkeypatch):
    """max_tokens ends a sequence right after a lead byte: the output text ends with what a full decode of
    its tokens gives, not with the byte dropped."""
    llm = _llm(folder)
    lead_byte = llm.get_tokenizer().convert_tokens_to_ids("ð")
    sampler = llm.engine.worker.sampler
    original = sampler.sample

    def forced(logits, seqs, eos):
        logits = torch.full_like(logits, -1e9)
        logits[:, lead_byte] = 0
        return original(logits, seqs, eos)

    monkeypatch.setattr(sampler, "sample", forced)
    [output] = llm.generate(_prompt(7), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert output.outputs[0].token_ids == [lead_byte]
    assert output.outputs[0].text == llm.get_tokenizer().decode([lead_byte]) == "\ufffd"

"""Chat prompts (the checkpoint's template, else its family's) and the sampling rules not covered elsewhere."""

import pytest
import torch

from clex_serve import LLM, SamplingParams
from clex_serve.engine.core.sequence import Sequence
from clex_serve.engine.worker.sampler import Sampler
from clex_serve.text.chat_template import VICUNA_SYSTEM, VICUNA_TEMPLATE, render_chat
from helpers.models import byte_level_tokenizer, model_with_tokenizer

MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is CLEX?"},
]


def test_llama_chat_falls_back_to_vicuna():
    text = render_chat(byte_level_tokenizer(), MESSAGES, "llama")
    assert text == f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello.</s> USER: What is CLEX? ASSISTANT:"


def test_mixtral_chat_falls_back_to_zephyr():
    text = render_chat(byte_level_tokenizer(), MESSAGES[:1], "mixtral")
    assert text == "<s><|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_checkpoint_template_wins():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert render_chat(tokenizer, MESSAGES[:1], "llama") == "[user]Hi"


def test_bad_message_is_refused():
    with pytest.raises(ValueError, match="role"):
        render_chat(byte_level_tokenizer(), [{"role": "robot", "content": "x"}], "llama")


def test_llm_chat_generates_from_the_rendered_prompt(tmp_path):
    llm = LLM(
        str(model_with_tokenizer("llama", tmp_path)),
        dtype="float32",
        device="cpu",
        show_progress=False,
        max_model_len=512,
        allow_long_max_model_len=True,
    )  # the tiny tokenizer spends many tokens on the system line
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    [chat] = llm.chat(MESSAGES, params)
    # The prompt ids are transformers' own tokenization of the conversation: one BOS, from the template.
    expected = llm.get_tokenizer().apply_chat_template(
        MESSAGES, chat_template=VICUNA_TEMPLATE, tokenize=True, add_generation_prompt=True
    )
    expected = list(expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected)
    assert chat.prompt_token_ids == expected
    bos = llm.get_tokenizer().bos_token_id
    assert chat.prompt_token_ids[0] == bos and chat.prompt_token_ids[1] != bos
    [plain] = llm.generate({"prompt_token_ids": expected}, params)
    assert chat.prompt.endswith("ASSISTANT:")
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids and len(chat.outputs[0].token_ids) == 5


def sample(logits, seqs, eos_token_ids):
    return Sampler(logits.shape[-1], torch.device("cpu")).sample(logits, seqs, eos_token_ids)


def _seq(params, prompt=(5, 6), output=()):
    seq = Sequence(0, "r", 0, list(prompt), params)
    seq.token_ids += list(output)
    return seq


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([[1.0, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0]])
    # token 1 appeared twice in the output: frequency 0.2 * 2 + presence 0.1 = 0.5 off its logit
    seq = _seq(SamplingParams(temperature=0, presence_penalty=0.1, frequency_penalty=0.2), output=(1, 1))
    assert sample(logits, [seq], [])[0].token_id == 0
    assert sample(logits, [_seq(SamplingParams(temperature=0))], [])[0].token_id == 1


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert sample(logits, [_seq(params)], eos_token_ids=[2])[0].token_id == 4


def test_logit_bias_moves_greedy_and_sampled_rows_and_leaves_logprobs_raw():
    vocab = 64  # more than one 16-lane block, so the C++ sampling path sees a full row
    logits = torch.zeros(3, vocab)
    logits[:, 7] = 5.0
    rows = [
        _seq(SamplingParams(temperature=0, logit_bias={3: 100}, logprobs=0)),
        _seq(SamplingParams(temperature=1.0, seed=1, logit_bias={9: 100})),
        _seq(SamplingParams(temperature=0, logit_bias={7: -100}, presence_penalty=0.5), output=(9,)),
    ]
    raw = logits.clone()
    chosen = sample(logits, rows, [])
    assert [token.token_id for token in chosen][:2] == [3, 9]
    assert chosen[2].token_id not in (7, 9)  # banned, and penalised below the untouched tokens
    assert torch.equal(logits, raw)  # the caller's logits stay raw
    # logprobs describe the model's own distribution, before the bias (as vLLM's do by default)
    assert abs(chosen[0].logprobs[3].logprob - torch.log_softmax(raw[0], -1)[3].item()) < 1e-6


def test_logprobs_report_rank_and_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0]])
    [token] = sample(logits, [_seq(SamplingParams(temperature=0, logprobs=2))], [])
    expected = torch.log_softmax(logits[0], -1)
    assert token.token_id == 3 and set(token.logprobs) == {3, 0}
    assert token.logprobs[3].rank == 1 and token.logprobs[0].rank == 2
    assert abs(token.logprobs[0].logprob - expected[0].item()) < 1e-6


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=50),
        dict(stop=[""]),
        dict(presence_penalty=3),
    ],
)
def test_invalid_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

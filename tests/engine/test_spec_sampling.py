"""Verifying drafts under sampling: the kept tokens follow plain sampling's distribution (rejection sampling
for a deterministic draft), a draft is kept with its probability, and a seeded sequence draws what plain
sampling draws."""

import pytest
import torch

from clex_serve import SamplingParams
from clex_serve.engine.spec_decode.verifier import DraftVerifier
from clex_serve.engine.worker.sampler import Sampler
from helpers.sequences import make_sequence


def _within(counts: torch.Tensor, probabilities: torch.Tensor, draws: int) -> bool:
    """Every token's count within 4 standard deviations of its expectation."""
    spread = (draws * probabilities * (1 - probabilities)).sqrt()
    return bool(((counts - draws * probabilities).abs() <= 4 * spread + 1e-9).all())


@pytest.mark.parametrize("cpu_kernel, top_k", [(True, 0), (False, 0), (False, 4)])  # top-k: PyTorch's path
def test_kept_tokens_follow_plain_sampling(cpu_kernel, top_k):
    """4,000 verifications of two drafts, the first an unlikely token, the second the likeliest: the first kept
    token follows the first row's distribution (temperature, top-k); after an accepted first draft the
    second follows the second row's; each draft is kept as often as its probability."""
    from clex_serve.kernels.cpu_extension import cpu_kernels_available

    if cpu_kernel and not cpu_kernels_available():
        pytest.skip("CPU kernels do not build here")
    vocab, temperature = 6, 0.8
    logits = torch.tensor(
        [[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 1.5, 0.2, 0.1, 0.0, -0.5], [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]]
    )
    drafts = [3, 1]
    params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=100)
    sampler = Sampler(vocab, torch.device("cpu"), seed=3, cpu_kernels=cpu_kernel)
    verifier = DraftVerifier(sampler, eos_token_ids=[])
    seq = make_sequence(0, 2, params)

    def distribution(row):
        scaled = logits[row].double() / temperature
        if top_k:
            scaled[scaled.argsort(descending=True)[top_k:]] = float("-inf")
        return scaled.softmax(dim=-1)

    draws = 4000
    first, second = torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64)
    lengths = []
    for _ in range(draws):
        kept = [token.token_id for token in verifier.verify(logits.clone(), seq, drafts)]
        lengths.append(len(kept))
        first[kept[0]] += 1
        if kept[0] == drafts[0]:
            second[kept[1]] += 1
    assert _within(first, distribution(0), draws), first
    accepted_first = int(first[drafts[0]])
    assert _within(second, distribution(1), accepted_first), second
    # Kept runs: one token when the first draft is refused, two when the second is, three when both pass.
    assert set(lengths) <= {1, 2, 3} and lengths.count(1) == draws - accepted_first
    assert lengths.count(3) == int(second[drafts[1]])


def test_a_seeded_sequence_draws_what_plain_sampling_draws():
    """Row by row the verifier consumes one uniform per kept token, like the sampler: a seeded sequence
    verified in runs of drafts samples the same tokens as one sampled a token at a time."""
    torch.manual_seed(0)
    vocab = 8
    steps = torch.randn(40, vocab)
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=100)

    plain_seq = make_sequence(0, 2, params)
    plain_seq.generator = torch.Generator().manual_seed(21)
    sampler = Sampler(vocab, torch.device("cpu"))
    plain = [sampler.sample(steps[i : i + 1].clone(), [plain_seq], [])[0].token_id for i in range(40)]

    seq = make_sequence(0, 2, params)
    seq.generator = torch.Generator().manual_seed(21)
    verifier = DraftVerifier(Sampler(vocab, torch.device("cpu")), [])
    verified, position, rejections = [], 0, 0
    while position < 40:
        # Drafts that are right for two tokens, then wrong: each verification keeps three.
        truth = plain[position : position + 4]
        drafts = truth[:2] + [(truth[2] + 1) % vocab] if len(truth) > 2 else truth[:1]
        rows = steps[position : position + len(drafts) + 1]
        kept = [token.token_id for token in verifier.verify(rows.clone(), seq, drafts[: rows.shape[0] - 1])]
        rejections += len(kept) <= len(drafts)
        verified += kept
        position += len(kept)
    assert verified[:40] == plain and rejections > 5

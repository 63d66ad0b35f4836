"""Per-step sampling time with repetition, presence and frequency penalties at 64 streams, against output
length, for clex-serve's sampler and for the former way (counts rebuilt from every token list at each step),
in one invocation.

    python bench/sampling_benchmark.py [--streams 64] [--vocab 32000] [--device cpu]

Prints the median step time at 100 and at 2,000 output tokens for both, and each one's ratio (2,000 / 100):
a sampler whose work does not grow with the output stays near 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from clex_serve.engine.core.sequence import Sequence  # noqa: E402
from clex_serve.engine.worker.sampler import Sampler  # noqa: E402
from clex_serve.sampling_params import SamplingParams  # noqa: E402

PARAMS = SamplingParams(
    temperature=0.8, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, max_tokens=None
)


def rebuilt_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The baseline: each step, every sequence's counts are rebuilt from its token lists."""
    for row, seq in enumerate(seqs):
        params = seq.params
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        values = logits[row, seen]
        logits[row, seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
        output = torch.tensor(seq.token_ids[seq.num_prompt_tokens :], dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=logits.shape[-1]).to(logits.dtype)
        logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def make_sequences(streams: int, output_len: int, vocab: int) -> list[Sequence]:
    generator = torch.Generator().manual_seed(0)
    seqs = []
    for index in range(streams):
        prompt = torch.randint(3, vocab, (64,), generator=generator).tolist()
        seq = Sequence(index, f"r{index}", 0, prompt, PARAMS)
        seq.token_ids += torch.randint(3, vocab, (output_len,), generator=generator).tolist()
        seqs.append(seq)
    return seqs


def step_time(sample_step, seqs: list[Sequence], vocab: int, device: torch.device, steps: int) -> float:
    """Median seconds of one sampling step over ``steps`` steps, each appending the sampled tokens."""
    generator = torch.Generator(device=device).manual_seed(1)
    times = []
    for _ in range(steps + 2):
        logits = torch.randn(len(seqs), vocab, generator=generator, device=device)
        start = time.perf_counter()
        tokens = sample_step(logits, seqs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
    return statistics.median(times[2:])  # the first steps fill the penalty tables once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def ours(lengths):
        sampler = Sampler(args.vocab, device)
        seqs = make_sequences(args.streams, lengths, args.vocab)
        return step_time(
            lambda logits, batch: [s.token_id for s in sampler.sample(logits, batch, [])],
            seqs,
            args.vocab,
            device,
            args.steps,
        )

    def baseline(lengths):
        sampler = Sampler(args.vocab, device)
        seqs = make_sequences(args.streams, lengths, args.vocab)

        def sample_step(logits, batch):
            plain = [
                Sequence(s.seq_id, s.request_id, 0, s.prompt_token_ids, SamplingParams(temperature=0.8)) for s in batch
            ]
            return [s.token_id for s in sampler.sample(rebuilt_penalties(logits, batch), plain, [])]

        return step_time(sample_step, seqs, args.vocab, device, args.steps)

    rows = []
    for name, measure in (
        ("clex-serve (device-resident counts)", ours),
        ("baseline (counts rebuilt per step)", baseline),
    ):
        # Alternating rounds, medians: drift on a shared machine hits both lengths alike.
        shorts, longs = [], []
        for _ in range(args.rounds):
            shorts.append(measure(100))
            longs.append(measure(2000))
        rows.append((name, statistics.median(shorts), statistics.median(longs)))
    print(
        f"{args.streams} streams, vocab {args.vocab}, {args.device}, threads {args.threads}; "
        f"medians of {args.rounds} alternating rounds of {args.steps} steps"
    )
    print("\n| sampler | step at 100 output tokens | step at 2,000 | ratio 2,000 / 100 |\n| --- | --- | --- | --- |")
    for name, short, long in rows:
        print(f"| {name} | {short * 1000:.1f} ms | {long * 1000:.1f} ms | {long / short:.2f} |")
    print(f"\nclex-serve at 2,000 tokens vs the baseline: {rows[1][2] / rows[0][2]:.1f}x faster")


if __name__ == "__main__":
    main()

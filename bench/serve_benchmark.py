"""clex-serve against ``transformers serve --continuous-batching`` on the same weights and the same load, in
one invocation.

    pip install accelerate   # transformers serve needs it
    python bench/serve_benchmark.py [--streams 1,4,16] [--max-tokens 128]

The model is bench_model's random plain Llama (8 layers, hidden 512, vocab 32000, ~58M parameters, float32,
CPU) with a word-level tokenizer and a minimal chat template. Each server runs alone (one after the other),
gets a warm-up request, then for each concurrency N, N streaming chat requests arrive together (prompts of
32 words, 128 output tokens). Prints output tokens/s and time-to-first-token p50 / p99 for both, and the
ratios (clex-serve / transformers; for TTFT, transformers / clex-serve, so above 1 is better for clex-serve).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_model import build  # noqa: E402

from helpers.servers import free_port, healthy_process  # noqa: E402 - the tests' server start, shared

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


async def one_stream(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> tuple[float, int]:
    """(time to first content in s, words of content received: one per token with this tokenizer)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        **extra,
    }
    started = time.monotonic()
    first, text = None, ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.monotonic()
                    text += content if text.endswith(" ") or not text else " " + content.lstrip()
    return (first or time.monotonic()) - started, len(text.split())


async def load(url: str, model: str, streams: int, max_tokens: int, seed: int, extra: dict) -> dict:
    rng = random.Random(seed)
    prompts = [" ".join(f"w{rng.randint(3, 31999)}" for _ in range(32)) for _ in range(streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.monotonic()
        results = await asyncio.gather(*(one_stream(client, url, model, p, max_tokens, extra) for p in prompts))
        elapsed = time.monotonic() - started
    ttfts = sorted(ttft for ttft, _ in results)
    tokens = sum(count for _, count in results)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"tokens_per_s": tokens / elapsed, "ttft_p50": statistics.median(ttfts), "ttft_p99": p99, "tokens": tokens}


def measure(
    name: str, command: list[str], url: str, model: str, streams: list[int], max_tokens: int, extra: dict
) -> dict:
    """``extra``: body fields only this server knows (clex-serve's ``ignore_eos``; with random weights EOS is
    rare either way, and the tokens actually received are what is counted)."""
    with healthy_process(command, url, env={"TOKENIZERS_PARALLELISM": "false"}):
        asyncio.run(load(url, model, 1, 8, 0, extra))  # warm up
        results = {}
        for count in streams:
            results[count] = asyncio.run(load(url, model, count, max_tokens, count, extra))
            row = results[count]
            print(
                f"{name}, {count} streams: {row['tokens_per_s']:.1f} out tok/s, TTFT p50 "
                f"{row['ttft_p50'] * 1000:.0f} ms, p99 {row['ttft_p99'] * 1000:.0f} ms ({row['tokens']} tokens)",
                flush=True,
            )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]

    with tempfile.TemporaryDirectory() as folder:
        plain, _ = build(Path(folder))
        config_path = plain / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config))
        model = str(plain)

        port = free_port()
        ours = measure(
            "clex-serve",
            [
                sys.executable,
                "-m",
                "clex_serve.cli.main",
                "--model",
                model,
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--port",
                str(port),
                "--max-num-seqs",
                str(max(streams)),
                "--served-model-name",
                model,
            ],
            f"http://127.0.0.1:{port}",
            model,
            streams,
            args.max_tokens,
            {"ignore_eos": True},
        )
        port = free_port()
        transformers_cli = str(Path(sys.executable).parent / "transformers")
        theirs = measure(
            "transformers serve",
            [
                transformers_cli,
                "serve",
                model,
                "--continuous-batching",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            f"http://127.0.0.1:{port}",
            model,
            streams,
            args.max_tokens,
            {},
        )

    print(
        f"\nmodel: random Llama, 8 layers, hidden 512, vocab 32000, float32, CPU ({os.cpu_count()} cores); "
        f"{args.max_tokens} output tokens per streaming chat request\n"
    )
    print(
        "| streams | clex-serve out tok/s | transformers out tok/s | ratio | clex-serve TTFT p50 / p99 | "
        "transformers TTFT p50 / p99 | TTFT p50 ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for count in streams:
        a, b = ours[count], theirs[count]
        print(
            f"| {count} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f} | "
            f"{a['ttft_p50'] * 1000:.0f} / {a['ttft_p99'] * 1000:.0f} ms | "
            f"{b['ttft_p50'] * 1000:.0f} / {b['ttft_p99'] * 1000:.0f} ms | {b['ttft_p50'] / a['ttft_p50']:.2f} |"
        )


if __name__ == "__main__":
    main()

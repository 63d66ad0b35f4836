"""Routing on Ray Serve: our CLEX-scale-aware router against Ray's default (power of two choices) and
against text-only prefix affinity (the same prefix tree keyed on token blocks alone, as Ray's, SGLang's and
vLLM's production-stack routers key theirs), on the same load, in one invocation.

    pip install 'clex-serve[ray]'
    python bench/replica_benchmark.py [--conversations 16] [--turns 8] [--rounds 1]

Two replicas of the embedded model (CLEX, base window 128 tokens, so the scale steps up every 128 tokens)
with prefix caching, 16-token blocks and a KV cache of ``--kv-cache-gib`` each, on a local Ray cluster.
16 conversations run at once; every turn resends the whole history (a shared system prompt, the earlier
questions and the model's answers) and adds a question, so that each conversation grows across several
scale boundaries. Each router gets freshly started replicas (empty caches) and the same conversations.
Printed per router: the prefix-cache hit rate (prompt tokens served from the cache, of those looked up, from
the replicas' own counters), time to first token p50 / p99 (client side, streaming), and the ratios to ours.

Both replicas share this machine's CPUs: their time to first token includes waiting for each other and for
Ray's processes, so latencies move between runs; the hit rates are the figures that carry over to a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers.servers import free_port  # noqa: E402

# Every conversation starts with the same long instructions (as deployments' system prompts and few-shot
# preambles do): the prefix that any replica may hold, at any scale, for any conversation.
SYSTEM = (
    "You are a careful assistant for Python programmers. You answer questions about the standard library, "
    "name the module and the function that does the job, show a short example when it helps, and say so "
    "plainly when something is not in the standard library. Examples of good answers: to read a JSON file, "
    "open it and call json.load on the file object; to list a directory, call os.listdir or iterate "
    "pathlib.Path.iterdir; to match a pattern, compile it with re.compile and call match or search; to "
    "time a piece of code, use time.perf_counter before and after it; to copy a file with its metadata, "
    "call shutil.copy2; to parse command-line arguments, build an argparse.ArgumentParser and call "
    "parse_args; to read a CSV file, open it with newline='' and pass it to csv.reader or csv.DictReader."
)
MODULES = ["json", "os", "sys", "re", "math", "time", "random", "string", "pathlib", "shutil", "socket", "csv"]
ROUTERS = [("ray", "Ray's default (power of two)"), ("text", "text-only prefix affinity"), ("clex", "ours")]


def question(rng: random.Random, conversation: int, turn: int) -> str:
    module = rng.choice(MODULES)
    return (
        f"Question {turn + 1} of conversation {conversation}: how do I use the {module} module to "
        f"{rng.choice(['read', 'write', 'parse', 'format', 'check', 'copy'])} "
        f"{rng.choice(['files', 'paths', 'numbers', 'dates', 'lines', 'records'])}?"
    )


async def conversation(
    client: httpx.AsyncClient, url: str, index: int, turns: int, max_tokens: int, ttfts: list, start_delay: float
) -> None:
    rng = random.Random(index)
    messages = [{"role": "system", "content": SYSTEM}]
    await asyncio.sleep(start_delay)
    for turn in range(turns):
        messages.append({"role": "user", "content": question(rng, index, turn)})
        body = {"model": "clex-serve-demo", "messages": messages, "max_tokens": max_tokens, "stream": True}
        body["temperature"] = 0  # the same answers, so the same histories, under every router
        sent, first, answer = time.perf_counter(), None, ""
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter()
                for text in re.findall(r'"content":"((?:[^"\\]|\\.)*)"', line):
                    answer += text.encode().decode("unicode_escape", errors="ignore")
        ttfts.append(first - sent)
        messages.append({"role": "assistant", "content": answer.strip() or "I do not know."})


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE))


async def run_load(url: str, args) -> dict:
    limits = httpx.Limits(max_connections=args.conversations * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        ttfts: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(
            *(
                conversation(client, url, i, args.turns, args.max_tokens, ttfts, 0.05 * i)
                for i in range(args.conversations)
            )
        )
        elapsed = time.perf_counter() - started
        metrics = (await client.get(f"{url}/metrics")).text
    hits = counter(metrics, "clex_serve_prefix_cache_hit_tokens_total")
    queried = counter(metrics, "clex_serve_prefix_cache_queried_tokens_total")
    ttfts.sort()
    decisions = dict(
        re.findall(r'^clex_serve_router_decisions_total\{decision="(\w+)"\} (\d+)$', metrics, re.MULTILINE)
    )
    return {
        "decisions": decisions,
        "hit_rate": hits / queried if queried else 0.0,
        "hits": hits,
        "queried": queried,
        "p50": statistics.median(ttfts),
        "p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
        "requests": len(ttfts),
        "elapsed": elapsed,
    }


def deploy(router: str, args):
    from ray import serve

    from clex_serve.deploy.ray import build_app

    app = build_app(
        {
            "num_replicas": 2,
            "router": router,
            "num_cpus_per_replica": 1,
            "num_gpus_per_replica": 0,
            "device": "cpu",
            "block_size": 16,
            "kv_cache_memory": args.kv_cache_gib,
            "max_num_seqs": 16,
            "seed": 0,
        }
    )
    serve.run(app, name="bench", route_prefix="/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24, help="answer length per turn")
    parser.add_argument("--kv-cache-gib", type=float, default=0.1, help="KV cache of each replica")
    parser.add_argument("--rounds", type=int, default=1, help="run the three routers this many times, in turn")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    results: dict[str, list[dict]] = {name: [] for name, _ in ROUTERS}
    try:
        for round_index in range(args.rounds):
            for name, label in ROUTERS:
                deploy(name, args)
                result = asyncio.run(run_load(url, args))
                results[name].append(result)
                print(
                    f"round {round_index + 1} {label}: hit rate {result['hit_rate']:.3f} "
                    f"({result['hits']:.0f} / {result['queried']:.0f} prompt tokens), TTFT p50 "
                    f"{result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms, "
                    f"{result['requests']} requests in {result['elapsed']:.1f} s; routed by "
                    f"{result['decisions'] or 'the default policy'}",
                    flush=True,
                )
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    print()
    print(
        f"{args.conversations} conversations x {args.turns} turns on 2 replicas (this machine's "
        f"{os.cpu_count()} CPUs shared by both), medians of {args.rounds} round(s)"
    )
    print("| router | prefix-cache hit rate | TTFT p50 | TTFT p99 | hit rate / ours | p50 / ours |")
    print("| --- | --- | --- | --- | --- | --- |")
    ours_rate, ours_p50 = med("clex", "hit_rate"), med("clex", "p50")
    for name, label in ROUTERS:
        rate, p50, p99 = med(name, "hit_rate"), med(name, "p50"), med(name, "p99")
        print(
            f"| {label} | {rate:.3f} | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | "
            f"{rate / ours_rate if ours_rate else float('nan'):.2f} | {p50 / ours_p50:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

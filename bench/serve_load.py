"""Load test of the OpenAI-compatible server (`python -m llama.serve`) over loopback.

    python -m bench.serve_load                       # bundled SmolLM2-135M-Instruct: 16 requests x 64 tokens
                                                     # at 1, 2, 4 and 8 concurrent clients (a few minutes on 2 cores)
    python -m bench.serve_load --requests 8 --new-tokens 16 --concurrency 1,8     # smoke run
    python -m bench.serve_load --json serve_load.json --plot serve_load.png

The server runs in a subprocess with --max-batch-size 8. For each concurrency c, c
clients share a fixed list of requests (each client sends its next request when the
previous one is answered) until all are done. Every request is a streamed chat
completion, greedy, of exactly --new-tokens tokens (min_tokens = max_tokens: stop
tokens are forbidden until then), so every level does the same work.

Measured per request, on the client: time to first token (TTFT, from sending the
request to the first chunk with text) and the gaps between chunks of text (inter-token
latency, ITL: a chunk is one token unless a character spans tokens). Per level:
requests/s and generated tokens/s over the level's wall time, p50/p99 of TTFT and
ITL, the server's mean batch (tokens generated per model step, from /health), and the
throughput relative to one client at a time (sequential serving).

Bounded: --requests requests per level, and --deadline seconds for the whole run.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, List, Optional

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "What is the capital of France? Tell me about its history.",
    "Explain how a rainbow forms, in simple words.",
    "Write a short poem about the sea.",
    "What are the main differences between Python and C?",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "What does a llama eat?",
    "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet.",
    "What is a prime number? Give examples.",
    "How does a bicycle stay upright?",
    "What causes the seasons on Earth?",
    "Explain what a neural network is to a child.",
    "What should I pack for a weekend hike?",
    "Why do cats purr?",
]


# --- The server -------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, *extra: str) -> subprocess.Popen:
    """`python -m llama.serve` in a subprocess, with `extra` options; its log goes to stderr."""
    command = [sys.executable, "-m", "llama.serve", "--port", str(args.port), "--max-batch-size",
               str(args.max_batch_size), "--max-seq-len", str(args.max_seq_len), "--log-level", "warning", *extra]
    if args.ckpt_dir:
        command += ["--ckpt-dir", args.ckpt_dir]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    return subprocess.Popen(command, cwd=REPO_ROOT)


def wait_until_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


# --- The clients ------------------------------------------------------------------------------------


async def stream_chunks(client: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """The JSON chunks of one streamed (server-sent events) request, up to `data: [DONE]`."""
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: "):])


async def one_request(client: httpx.AsyncClient, url: str, question: str, new_tokens: int) -> dict:
    """Streams one chat completion; returns its TTFT, its chunk gaps, its tokens and its latency (seconds)."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async for chunk in stream_chunks(client, url + "/v1/chat/completions", body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.perf_counter())
    return {
        "ttft": arrivals[0] - start,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "tokens": tokens,
        "latency": time.perf_counter() - start,
    }


async def run_level(url: str, questions: List[str], concurrency: int, new_tokens: int) -> dict:
    """`concurrency` clients work through `questions`; returns the level's wall time and per-request results."""
    pending = list(enumerate(questions))
    results: List[Optional[dict]] = [None] * len(questions)

    async def client_loop(client: httpx.AsyncClient):
        while pending:
            i, question = pending.pop(0)
            results[i] = await one_request(client, url, question, new_tokens)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall": wall, "requests": results}


def percentile(values: List[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(concurrency: int, level: dict, steps: int) -> dict:
    requests = level["requests"]
    ttfts = [r["ttft"] for r in requests]
    gaps = [g for r in requests for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in requests)
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": level["wall"],
        "requests_per_s": len(requests) / level["wall"],
        "tokens_per_s": tokens / level["wall"],
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
        "itl_p99_ms": 1000 * percentile(gaps, 99),
        "latency_p50_s": statistics.median(r["latency"] for r in requests),
        "mean_batch": tokens / steps if steps else float("nan"),
    }


# --- Report -----------------------------------------------------------------------------------------


def markdown_table(rows: List[dict]) -> str:
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    lines = [
        "| clients | requests/s | tokens/s | vs 1 client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | mean batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {ratio} "
            f"| {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | {r['itl_p50_ms']:.0f} ms "
            f"| {r['itl_p99_ms']:.0f} ms | {r['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    clients = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["tokens_per_s"] for r in rows], "o-")
    left.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput", xticks=clients)
    right.plot(clients, [r["ttft_p50_ms"] for r in rows], "o-", label="TTFT p50")
    right.plot(clients, [r["itl_p50_ms"] for r in rows], "s-", label="ITL p50")
    right.plot(clients, [r["itl_p99_ms"] for r in rows], "s--", label="ITL p99")
    right.set(xlabel="concurrent clients", ylabel="ms", title="latency", xticks=clients)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


# --- Main -------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt-dir", help="checkpoint to serve (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated numbers of clients")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--server-threads", type=int, help="the server's --threads (default: torch's choice)")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    return parser.parse_args(argv)


async def run_all(url: str, args, levels: List[int]) -> List[dict]:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    await run_level(url, questions[:1], 1, 8)  # warm-up: first-call allocations
    rows = []
    async with httpx.AsyncClient() as client:
        for concurrency in levels:
            before = (await client.get(url + "/health")).json()
            level = await run_level(url, questions, concurrency, args.new_tokens)
            after = (await client.get(url + "/health")).json()
            steps = sum(after.get(k, 0) - before.get(k, 0) for k in ("steps", "prefill_steps"))
            rows.append(summarize(concurrency, level, steps))
            print(f"{concurrency} client(s): {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    args.port = args.port or free_port()
    levels = [int(c) for c in args.concurrency.split(",")]
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(args)
    try:
        wait_until_ready(url, server, timeout=600)
        rows = asyncio.run(asyncio.wait_for(run_all(url, args, levels), timeout=args.deadline))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("requests", "new_tokens", "max_batch_size", "max_seq_len",
                                                   "server_threads")},
        "levels": rows,
    }
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

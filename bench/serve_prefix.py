"""Multi-turn chats over a shared system prompt, with and without the server's prefix cache.

    python -m bench.serve_prefix                         # 32 chats x 4 turns, a ~1,000-token system prompt,
                                                         # 8 chats at a time (bundled SmolLM2; long on 2 cores)
    python -m bench.serve_prefix --chats 8 --concurrency 4 --new-tokens 16      # a shorter run

Chat clients resend the whole conversation every turn, and requests share a system prompt:
the case prefix caching is for. Each chat sends its 4 user turns one after the other, each
request the whole dialog so far (system prompt, earlier questions and the answers received),
streamed, greedy, exactly --new-tokens tokens. --concurrency chats run at once. The same
chats run against two servers, one after the other: --prefix-cache-tokens 0 (off) and the
default (on). Reported per server: time to first token p50/p99 (from sending a request to
its first chunk of text), output tokens/s over the run's wall time, the prefix-cache hit
rate from /metrics; and the TTFT p50 ratio off / on.
"""

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import List

import httpx

from bench.serve_load import QUESTIONS, free_port, percentile, start_server, stream_chunks, wait_until_ready

RULES = [
    "Answer in the language of the question.", "Prefer short sentences.", "Say so when you are not sure.",
    "Give one example when it helps.", "Never invent a source.", "Use metric units.", "Keep lists short.",
    "Explain terms a child would not know.", "Do not repeat the question.", "End with the key point.",
]


def system_prompt(n_rules: int) -> str:
    """A long, varied system prompt: numbered house rules (about 12 tokens each)."""
    return "You are the assistant of a public library. House rules:\n" + "\n".join(
        f"{i + 1}. {RULES[i % len(RULES)]} (rule group {i // len(RULES) + 1})" for i in range(n_rules))


async def chat_turn(client: httpx.AsyncClient, url: str, messages: List[dict], new_tokens: int) -> dict:
    """One streamed turn; its TTFT, its answer's text and tokens, and the prompt's tokens."""
    body = {"messages": messages, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, usage = None, [], {}
    async for chunk in stream_chunks(client, url + "/v1/chat/completions", body):
        usage = chunk.get("usage") or usage
        piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
        if piece:
            ttft = time.perf_counter() - start if ttft is None else ttft
            text.append(piece)
    return {"ttft": ttft, "text": "".join(text), "tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0)}


async def run_chats(url: str, system: str, chats: int, turns: int, concurrency: int, new_tokens: int) -> dict:
    pending = list(range(chats))
    turns_done: List[dict] = []

    async def client_loop(client: httpx.AsyncClient):
        while pending:
            chat = pending.pop(0)
            messages = [{"role": "system", "content": system}]
            for turn in range(turns):
                question = QUESTIONS[(chat + turn) % len(QUESTIONS)]
                messages.append({"role": "user", "content": question})
                result = await chat_turn(client, url, messages, new_tokens)
                messages.append({"role": "assistant", "content": result["text"]})
                turns_done.append(result)

    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        metrics = (await client.get(url + "/metrics")).text
    hit_rate = next((float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("llama_prefix_cache_hit_rate ")), 0.0)
    ttfts = [t["ttft"] for t in turns_done]
    return {"turns": len(turns_done), "wall_s": wall, "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99), "output_tokens_per_s": sum(t["tokens"] for t in turns_done) / wall,
            "prompt_tokens_mean": sum(t["prompt_tokens"] for t in turns_done) / len(turns_done),
            "prefix_cache_hit_rate": hit_rate}


def serve_and_run(args, system: str, prefix_cache_tokens: List[str]) -> dict:
    args.port = free_port()
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(args, *prefix_cache_tokens)
    try:
        wait_until_ready(url, server, timeout=600)
        return asyncio.run(run_chats(url, system, args.chats, args.turns, args.concurrency, args.new_tokens))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_prefix", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt-dir", help="checkpoint to serve (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="chats at a time")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--system-rules", type=int, default=80, help="lines of the system prompt (~12 tokens each)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--server-threads", type=int, help="the server's --threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    system = system_prompt(args.system_rules)
    rows = {}
    for name, extra in (("prefix cache off", ["--prefix-cache-tokens", "0"]), ("prefix cache on", [])):
        rows[name] = serve_and_run(args, system, extra)
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr)
    off, on = rows["prefix cache off"], rows["prefix cache on"]
    print("| server | turns | mean prompt tokens | TTFT p50 (s) | TTFT p99 (s) | output tokens/s | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['turns']} | {r['prompt_tokens_mean']:.0f} | {r['ttft_p50_s']:.3f} | "
              f"{r['ttft_p99_s']:.3f} | {r['output_tokens_per_s']:.1f} | {r['prefix_cache_hit_rate']:.3f} |")
    print(f"TTFT p50 off / on: {off['ttft_p50_s'] / on['ttft_p50_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()

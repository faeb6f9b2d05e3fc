"""Serving throughput: many requests of mixed lengths, as servers are judged (nano-vllm's bench).

    python -m bench.throughput [--requests 64] [--min-len 32] [--max-len 512] [--max-batch-size 8]
                               [--engines engine,static,transformers,llama.cpp] [--compile] [--threads N]

N requests, each a prompt of random token ids and a number of new tokens, both drawn uniformly
between --min-len and --max-len with a fixed seed. Every request gets exactly its number of new
tokens (stop tokens are forbidden until then, `ignore_eos`-style), greedy. Reported per engine:
output tokens / wall time (the requested tokens only: a static batch that runs past a request's
length does not count the extra), and time to first token, p50 and p99, from the start of the run
(every request is submitted at time 0):

  engine        this library's engine, continuous batching: every request added at once,
                `Engine.step()` until all are done (what `llama serve` runs)
  static        `Llama.generate` on consecutive batches of --max-batch-size requests, each run to
                its longest request
  transformers  transformers' `generate` on the same batches, left-padded (the GGUF dequantized)
  llama.cpp     llama-cpp-python, one request after another (its `generate` has no batching); when installed

Each engine runs in this process in turn, with the same thread count. The JSON (and a PNG where
matplotlib is installed) go to bench/results/.
"""

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

from bench.engines import LlamaCppEngine, TransformersEngine, left_padded
from bench.meters import machine_info
from llama.default_model import default_gguf_path, ensure_default_model

RESULTS = Path(__file__).parent / "results"
ENGINES = ("engine", "static", "transformers", "llama.cpp")


@dataclass
class Workload:
    prompts: List[List[int]]
    new_tokens: List[int]  # per request


def make_workload(requests: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> Workload:
    rng = random.Random(seed)
    lengths = [(rng.randint(min_len, max_len), rng.randint(min_len, max_len)) for _ in range(requests)]
    # Ids past the first 256, where tokenizers keep their special and byte tokens.
    prompts = [[rng.randrange(256, vocab_size) for _ in range(p)] for p, _ in lengths]
    return Workload(prompts, [n for _, n in lengths])


def summary(seconds: float, first_token: List[float], workload: Workload) -> dict:
    ttft = sorted(first_token)
    return {
        "seconds": seconds,
        "output_tokens": sum(workload.new_tokens),
        "output_tok_s": sum(workload.new_tokens) / seconds,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
    }


def run_engine(llm, workload: Workload, bar: tqdm) -> dict:
    """Continuous batching: all requests submitted at once, the engine stepped until they are done."""
    engine = llm.engine
    first_token: Dict[int, float] = {}
    requests = [llm.request([prompt], n, temperature=0.0, top_p=1.0, min_gen_len=n)
                for prompt, n in zip(workload.prompts, workload.new_tokens)]
    t0 = time.perf_counter()
    for request in requests:
        engine.add(request)
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            first_token.setdefault(out.sequence.id, now)
        bar.update(len(outputs))
    return summary(time.perf_counter() - t0, list(first_token.values()), workload)


def run_static(generate_batch: Callable[[List[List[int]], int, Callable[[], None]], None], workload: Workload,
               batch_size: int, bar: tqdm) -> dict:
    """Consecutive batches of batch_size requests, each generated to its longest request's length.
    generate_batch(prompts, n, on_first_token) runs one batch and calls on_first_token once."""
    first_token: List[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start : start + batch_size]
        lengths = workload.new_tokens[start : start + batch_size]
        seen = []
        generate_batch(prompts, max(lengths), lambda: seen.append(time.perf_counter() - t0) if not seen else None)
        first_token += seen[:1] * len(prompts)
        bar.update(sum(lengths))
    return summary(time.perf_counter() - t0, first_token, workload)


def ours_static(llm) -> Callable:
    def generate_batch(prompts, n, on_first_token):
        with llm.engine.observe(lambda request, logits, tokens: on_first_token()):
            llm.generate(prompts, n, temperature=0.0, top_p=1.0, min_gen_len=n)
    return generate_batch


def transformers_static(peer: TransformersEngine) -> Callable:
    class FirstToken:  # transformers' streamer protocol: put(prompt ids), then put(each new token)
        def __init__(self, callback):
            self.calls, self.callback = 0, callback

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.callback()

        def end(self):
            pass

    @torch.inference_mode()
    def generate_batch(prompts, n, on_first_token):
        ids, mask = left_padded(prompts, peer.pad_id)
        peer.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None,
                            top_k=None, max_new_tokens=n, min_new_tokens=n, pad_token_id=peer.pad_id,
                            streamer=FirstToken(on_first_token))
    return generate_batch


def llama_cpp_sequential(peer: LlamaCppEngine) -> Callable:
    def generate_batch(prompts, n, on_first_token):
        (prompt,) = prompts
        peer.llm.reset()
        steps = peer.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for count, _ in enumerate(steps, 1):  # never stops on its own
            if count == 1:
                on_first_token()
            if count == n:
                break
        steps.close()
    return generate_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=32, help="shortest prompt and output (tokens)")
    parser.add_argument("--max-len", type=int, default=512, help="longest prompt and output (tokens)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="engine rows, and the static batches")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"from {','.join(ENGINES)}")
    parser.add_argument("--compile", action="store_true", help="ours with compile=True (compiled before timing)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-dir", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--gguf", default=None, help="the same weights for the peers (default: the bundled GGUF)")
    parser.add_argument("--json", default=None, help="default: bench/results/throughput-<time>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")

    from llama import Llama

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else ensure_default_model()[0]
    gguf = args.gguf or str(default_gguf_path())
    llm = None
    if {"engine", "static"} & set(engines):
        llm = Llama.build(ckpt_dir, ckpt_dir / "tokenizer.model", max_seq_len=2 * args.max_len,
                          max_batch_size=args.max_batch_size, compile=args.compile)
    vocab_size = llm.model.params.vocab_size if llm else json.loads((ckpt_dir / "params.json").read_text())["vocab_size"]
    workload = make_workload(args.requests, args.min_len, args.max_len, vocab_size, args.seed)
    if args.compile and llm is not None:  # compile every batch bucket before the clock starts
        for rows in {min(1 << i, args.max_batch_size) for i in range(args.max_batch_size.bit_length())}:
            llm.generate([[300, 301]] * rows, 2, temperature=0.0)

    spec = {"device": "cpu", "dtype": "float32", "gguf": gguf, "threads": args.threads,
            "max_context": 2 * args.max_len, "vocab_size": vocab_size}
    results = {}
    for name in engines:
        bar = tqdm(total=sum(workload.new_tokens), desc=name, unit="tok", leave=False)
        try:
            if name == "engine":
                results[name] = run_engine(llm, workload, bar)
            elif name == "static":
                results[name] = run_static(ours_static(llm), workload, args.max_batch_size, bar)
            elif name == "transformers":
                peer = TransformersEngine(spec)
                peer.prepare(spec["max_context"], args.max_batch_size)
                results[name] = run_static(transformers_static(peer), workload, args.max_batch_size, bar)
                del peer
            else:
                peer = LlamaCppEngine(spec)
                peer.prepare(spec["max_context"], 1)
                results[name] = run_static(llama_cpp_sequential(peer), workload, 1, bar)
                del peer
        except ImportError as e:
            results[name] = {"error": f"not installed: {e}"}
        bar.close()
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    report = {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("json",)}, "ckpt_dir": str(ckpt_dir),
                     "gguf": gguf},
        "machine": machine_info(torch.device("cpu"), args.threads),
        "results": results,
    }
    path = Path(args.json) if args.json else RESULTS / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(render_table(report))
    print(f"wrote {path}")


def render_table(report: dict) -> str:
    results = report["results"]
    base = {name: results[name].get("output_tok_s") for name in ("transformers", "static")}
    lines = ["| engine | output tok/s | TTFT p50 s | TTFT p99 s | vs transformers | vs static |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | |")
            continue
        ratios = [f"{r['output_tok_s'] / b:.2f}×" if b else "" for b in base.values()]
        lines.append(f"| {name} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.1f} | {r['ttft_p99_s']:.1f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

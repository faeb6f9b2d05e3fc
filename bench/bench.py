"""Benchmarks: this library's configurations against transformers, llama.cpp and Meta's reference.

    python -m bench.bench                             # everything: ~30 minutes on 2 CPU cores
    python -m bench.bench --quick --configs eager     # the shortest run (--quick with every config: 31 min, 2 busy cores)

Workloads, all greedy with exactly N new tokens per row (stop tokens never end a run early):
    decode, batch 1   a short chat prompt, N new tokens (default 128)
    decode, batch 8   8 different chat prompts, N new tokens each
    prefill           one 1024-token prompt: time to first token and prefill tokens/s
    sweep             decode tokens/s at batch sizes 1, 2, 4, 8 (a PNG plot)

Timing uses whole calls of each engine's own generation: the time to first token (TTFT) is
that of a 1-token generation, the decode time that of an N-token generation minus the TTFT.

Each engine (one of our configurations, or a peer) runs in a fresh subprocess, one after
the other: memory figures are its own, and nothing it leaves behind (compiled graphs,
allocator caches, threads) touches the next. The parent measures the machine's memory
bandwidth, prepares the prompts' token ids once (every engine gets the same ids), and
writes the report: a markdown table on stdout, JSON, and the plot.

See bench/README.md for what each column means.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench import log
from bench.meters import machine_info, measure_bandwidth
from bench.report import BASELINE, plot, render_markdown
from bench.worker import run_worker

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Our configurations: the keyword arguments each adds to `Llama.build`.
# "a+b" combines them ("compiled+int8"); "name@bfloat16" overrides the dtype.
CONFIGS: Dict[str, dict] = {
    "eager": {},
    "compiled": {"compile": True},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "llm.int8": {"quantize": "llm.int8"},
}
PEERS = ("transformers", "llama.cpp", "meta")
DEFAULT_PEERS = ("transformers", "llama.cpp")  # Meta's reference (llama-models) is opt-in: --peers ...,meta

# Eight different short chat prompts; the first is the batch-1 workload.
QUESTIONS = [
    "What is the capital of France? Tell me about its history.",
    "Explain how a rainbow forms, in simple words.",
    "Write a short poem about the sea.",
    "Give me three tips for learning to program.",
    "Why is the sky blue?",
    "Describe a healthy breakfast and why it is good for you.",
    "What are the main differences between cats and dogs as pets?",
    "Summarise the plot of a detective story you invent.",
]
# Filler for the long prefill prompt (repeated, then cut to the exact length).
PARAGRAPH = (
    "The history of computing is a story of ideas meeting materials. Mechanical calculators gave "
    "way to relays, relays to vacuum tubes, tubes to transistors, and transistors to integrated "
    "circuits holding billions of switches. Each step made machines smaller, faster and cheaper, "
    "and each step changed what people believed a computer was for. "
)


def parse_configs(text: str) -> List[dict]:
    """'eager,compiled+int8,int4@bfloat16' -> [{"config", "build_kwargs", "dtype"}]."""
    configs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, dtype = item.partition("@")
        kwargs = {}
        for part in name.split("+"):
            if part not in CONFIGS:
                raise SystemExit(f"unknown configuration {part!r} in {item!r}; choose from {', '.join(CONFIGS)}")
            kwargs.update(CONFIGS[part])
        configs.append({"config": item, "build_kwargs": kwargs, "dtype": dtype or None})
    return configs


def build_prompts(tokenizer_path: Path, prefill_len: int) -> dict:
    """Token ids of the chat prompts and of the long prefill prompt, in the checkpoint's chat format."""
    from llama.chat_format import make_chat_format
    from llama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    formatter = make_chat_format(tokenizer)
    chats = [formatter.encode_dialog_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    long_prompt = []
    if prefill_len > 0:
        text = PARAGRAPH
        while True:
            long_prompt = formatter.encode_dialog_prompt([{"role": "user", "content": text}])
            if len(long_prompt) >= prefill_len:
                break
            text += PARAGRAPH
        long_prompt = long_prompt[:prefill_len]
    return {"chats": chats, "prefill": long_prompt, "vocab_size": tokenizer.n_words}


def default_dtype(device: torch.device) -> str:
    from llama.distributed import choose_dtype

    return str(choose_dtype(device)).removeprefix("torch.")


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 new tokens, 3 timed runs, batch sizes 1 and 8, 512-token prefill")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"our configurations, comma-separated, from {', '.join(CONFIGS)}; "
                        "'a+b' combines, 'name@bfloat16' sets the dtype (default: all)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"peers, comma-separated, from {', '.join(PEERS)}, or 'none' "
                        f"(default: {','.join(DEFAULT_PEERS)})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="default: the library's (fp32 on CPU, bf16 on GPUs)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128; quick 32)")
    parser.add_argument("--batch-sizes", default=None, help="decode sweep (default 1,2,4,8; quick 1,8)")
    parser.add_argument("--prefill-len", type=int, default=None, help="prefill prompt tokens (default 1024; quick 512; 0 skips)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs, median reported (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before each workload (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every engine (default: CPUs available)")
    parser.add_argument("--ckpt-dir", default=None, help="Meta-format checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf", default=None, help="GGUF file of the same weights for the peers (default: the bundled one)")
    parser.add_argument("--json", default=None, help="results file (default: bench/results/<name>.json)")
    parser.add_argument("--name", default=None, help="stem of the default output files (default: a timestamp)")
    parser.add_argument("--plot", default=None, help="PNG of tokens/s vs batch size (default: beside the JSON)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one batch-1 decode run")
    args = parser.parse_args(argv)

    new_tokens = args.new_tokens or (32 if args.quick else 128)
    runs = args.runs or (3 if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8" if args.quick else "1,2,4,8")).split(",")]
    prefill_len = args.prefill_len if args.prefill_len is not None else (512 if args.quick else 1024)
    if args.warmup < 1 or runs < 1 or new_tokens < 2:
        raise SystemExit("--warmup and --runs must be >= 1 and --new-tokens >= 2")
    if max(batch_sizes) > len(QUESTIONS):
        raise SystemExit(f"batch sizes up to {len(QUESTIONS)} (there are {len(QUESTIONS)} prompts)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or default_dtype(device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    configs = parse_configs(args.configs)
    peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {', '.join(PEERS)} or none")

    if args.ckpt_dir:
        ckpt_dir = Path(args.ckpt_dir)
        tokenizer_path = ckpt_dir / "tokenizer.model"
    else:
        from llama.default_model import ensure_default_model

        ckpt_dir, tokenizer_path = ensure_default_model()
    gguf, gguf_error = None, None
    if {"transformers", "llama.cpp"} & set(peers):
        try:
            if args.gguf:
                gguf = Path(args.gguf)
            else:
                from llama.default_model import default_gguf_path

                gguf = default_gguf_path()
        except Exception as e:
            gguf_error = f"no GGUF for the peers: {type(e).__name__}: {e}"
    prompts = build_prompts(tokenizer_path, prefill_len)
    chats = prompts["chats"][: max(batch_sizes)]

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS_DIR / f"{args.name or stamp}.json"
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")

    log(f"measuring memory bandwidth on {device} ...")
    bandwidth = measure_bandwidth(device)
    info = machine_info(device, threads)
    log(f"streamed bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (matrix-vector"
        f" {bandwidth['matvec_bytes_per_s'] / 1e9:.1f} GB/s, sum {bandwidth['sum_bytes_per_s'] / 1e9:.1f} GB/s)")

    common = {
        "device": str(device), "threads": threads, "new_tokens": new_tokens, "batch_sizes": batch_sizes,
        "runs": runs, "warmup": args.warmup, "profile": args.profile, "prompts": chats,
        "prefill_prompt": prompts["prefill"], "prefill_len": prefill_len, "vocab_size": prompts["vocab_size"],
        "ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path), "gguf": str(gguf) if gguf else None,
        "decode_context": max(map(len, chats)) + new_tokens,
        "max_context": max(max(map(len, chats)) + new_tokens, prefill_len + 1),
        "max_batch": max(batch_sizes),
    }
    specs = []
    for peer in [p for p in peers if p == BASELINE] + [p for p in peers if p != BASELINE]:
        name = {"transformers": "transformers", "llama.cpp": "llama.cpp (Q4_1)", "meta": "Meta reference"}[peer]
        specs.append({**common, "kind": peer, "name": name, "dtype": dtype})
    for config in configs:
        specs.append({**common, "kind": "ours", "name": f"llama {config['config']}", "config": config["config"],
                      "build_kwargs": config["build_kwargs"], "dtype": config["dtype"] or dtype})

    results = []
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as workdir:
        for index, spec in enumerate(specs):
            spec["index"] = index
            if spec["kind"] in ("transformers", "llama.cpp") and gguf is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "reason": gguf_error,
                          "decode": {}}
            elif spec["kind"] == "llama.cpp" and info["llama_cpp"] is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "decode": {},
                          "reason": "llama_cpp is not importable (pip install llama-cpp-python; builds llama.cpp)"}
            elif spec["kind"] == "meta" and info["llama_models"] is None:
                result = {"name": spec["name"], "kind": spec["kind"], "status": "unavailable", "decode": {},
                          "reason": "llama_models is not importable (pip install llama-models)"}
            else:
                # The machine's bandwidth drifts within a run (shared hosts): each engine's bound is the mean
                # of the bandwidth measured just before and just after it runs, not the one at the start.
                before = measure_bandwidth(device)["bytes_per_s"]
                result = run_worker(spec, Path(workdir))
                result["bandwidth_bytes_per_s"] = (before + measure_bandwidth(device)["bytes_per_s"]) / 2
            if result["status"] != "ok":
                log(f"[{spec['name']}] unavailable: {result['reason']}")
            result["dtype"] = spec["dtype"] if spec["kind"] != "llama.cpp" else "Q4_1 (GGUF as is)"
            results.append(result)

    settings = {k: common[k] for k in ("device", "threads", "new_tokens", "batch_sizes", "runs", "warmup",
                                       "prefill_len", "ckpt_dir", "gguf")}
    settings.update(dtype=dtype, quick=args.quick, prompt_lens=[len(p) for p in chats],
                    checkpoint_bytes=checkpoint_bytes(ckpt_dir),
                    gguf_bytes=gguf.stat().st_size if gguf and gguf.is_file() else None)
    report = {"created": stamp, "argv": sys.argv, "machine": info, "bandwidth": bandwidth, "settings": settings,
              "engines": results}
    markdown = render_markdown(report)
    print(markdown)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    json_path.with_suffix(".md").write_text(markdown + "\n")
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    plot(report, plot_path)


def checkpoint_bytes(ckpt_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("consolidated.*.pth"))


if __name__ == "__main__":
    main()

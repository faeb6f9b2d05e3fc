"""How long `compile=True` makes a user wait: the first-ever compilation, and a later process.

    python -m bench.compile_startup [--batch-size 1] [--threads N] [--ckpt-dir DIR]

Runs the same script in fresh processes, one after another, against an empty inductor cache
directory (a temporary `TORCHINDUCTOR_CACHE_DIR`) and an empty `llama.kernels` cache (a temporary
`LLAMA_KERNELS_CACHE`: the first process, eager, builds the CPU kernels): first eager (the
reference), then compiled twice. Each process builds the model, generates 2 tokens (the compilation happens here, on the
first decode step) and then decodes 64 more greedy tokens per row. Reported per process: build
seconds, seconds to those first tokens, steady decode tokens/s, and whether its tokens equal
eager's. The second compiled process finds the first one's artefacts in the cache.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ONE_PROCESS = """
import json, sys, time
import torch
from llama import Llama
ckpt_dir, batch_size, compile_, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
torch.set_num_threads(threads)
t0 = time.perf_counter()
llm = Llama.build(ckpt_dir, ckpt_dir + "/tokenizer.model", max_seq_len=256, max_batch_size=batch_size,
                  compile=compile_)
t1 = time.perf_counter()
prompts = [[1, 2, 3, 4, 5, 6, 7, 8]] * batch_size
llm.generate(prompts, 2, temperature=0)
t2 = time.perf_counter()
tokens, _ = llm.generate(prompts, 64, temperature=0)
t3 = time.perf_counter()
print(json.dumps({"build_s": t1 - t0, "first_tokens_s": t2 - t1, "decode_tok_s": 64 * batch_size / (t3 - t2),
                  "tokens": tokens[0]}))
"""


def run_one(ckpt_dir: str, batch_size: int, compile_: bool, threads: int, env: dict) -> dict:
    command = [sys.executable, "-c", ONE_PROCESS, ckpt_dir, str(batch_size), "1" if compile_ else "0", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {'compiled' if compile_ else 'eager'} process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ckpt-dir", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.ckpt_dir is None:
        from llama.default_model import ensure_default_model

        args.ckpt_dir = str(ensure_default_model()[0])
    repo = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "LLAMA_KERNELS_CACHE": str(Path(cache) / "kernels"),
               "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        runs = {"eager": run_one(args.ckpt_dir, args.batch_size, False, args.threads, env)}
        for name in ("compiled, first process", "compiled, second process"):
            runs[name] = run_one(args.ckpt_dir, args.batch_size, True, args.threads, env)
    print(f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}\n")
    print("| process | build s | first tokens s | decode tok/s | tokens = eager's |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['build_s']:.1f} | {r['first_tokens_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r['tokens'] == runs['eager']['tokens']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()

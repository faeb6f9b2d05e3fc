"""Speculative decoding's speed-up at batch 1: each proposer against plain decoding of the same
configuration (eager, compiled), in one process, the configurations' runs interleaved.

    python -m bench.speculative [--threads N] [--new-tokens 128] [--runs 3] [--modes eager compiled] [--json FILE]

Two greedy chat prompts to the bundled SmolLM2-135M-Instruct (or --ckpt-dir):
    explain   an open question ("Describe the water cycle in detail."): new text, for model drafts
    rewrite   a paragraph to rewrite with small edits: the answer copies most of the prompt,
              for prompt lookup
Configurations (--configs): plain (no speculation), int4 and int8 (the model's own weights
quantized as the draft), prompt-lookup; each eager and/or compiled (--modes: the model's and the
draft's decode steps compiled; the verify pass is eager, as prefill is). Reported per
(configuration, prompt): decode tokens/s, the median of --runs runs, each
(tokens - 1) / (time of the whole generation - time of a 1-token generation, the prefill: the
model's, and a draft model's, which reads the prompt in the same step),
the speed-up over plain decoding of the same mode, the draft tokens accepted / proposed, and
tokens per model pass. Every run's greedy tokens must equal plain decoding's.
"""

import argparse
import json
import platform
import statistics
import time

import torch

from llama import Llama

PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its "
             "keeper climbed the narrow stairs, lit the great lamp and watched the ships pass safely through the "
             "dark water below. When the storms came in autumn, the waves crashed against the rocks and the wind "
             "howled around the tower, but the light never went out. The people of the village said that as long "
             "as the lighthouse shone, no sailor would ever be lost at sea.")
PROMPTS = {
    "explain": "Describe the water cycle in detail.",
    "rewrite": f"Rewrite the following paragraph, replacing 'lighthouse' with 'beacon' and changing nothing "
               f"else:\n\n{PARAGRAPH}",
}


def build(ckpt_dir, tokenizer, config: str, compile_: bool, max_seq_len: int, tokens: int) -> Llama:
    speculative = None if config == "plain" else config
    return Llama.build(ckpt_dir, tokenizer, max_seq_len=max_seq_len, max_batch_size=1, compile=compile_,
                       speculative=speculative, speculative_tokens=tokens)


def decode_rate(llama: Llama, prompt, new_tokens: int):
    """(decode tokens/s, the tokens) of one greedy generation, the prefill's time taken off."""
    start = time.perf_counter()
    llama.generate([prompt], 1, temperature=0)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens, _ = llama.generate([prompt], new_tokens, temperature=0)
    elapsed = time.perf_counter() - start
    return (len(tokens[0]) - 1) / max(elapsed - prefill, 1e-9), tokens[0]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt-dir", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--configs", nargs="+", default=["plain", "int4", "int8", "prompt-lookup"],
                        choices=["plain", "int4", "int8", "prompt-lookup"])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="eager, compiled, or both (default: eager)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speculative-tokens", type=int, default=None, help="draft tokens per round "
                        "(default: the library's, 4 for model drafts, 15 for prompt lookup)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ckpt_dir is None:
        from llama.default_model import ensure_default_model

        ckpt_dir, tokenizer = ensure_default_model()
    else:
        ckpt_dir, tokenizer = args.ckpt_dir, f"{args.ckpt_dir}/tokenizer.model"
    print(f"# bench.speculative: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, batch 1, greedy, {args.new_tokens} new tokens, median of {args.runs}")
    print("| mode | config | prompt | tok/s | speed-up | accepted / drafted | tokens per pass |")
    print("|---|---|---|---|---|---|---|")
    results = []
    configs = ["plain"] + [c for c in args.configs if c != "plain"]
    for compile_ in [mode == "compiled" for mode in args.modes]:
        mode = "compiled" if compile_ else "eager"
        # Every configuration built first, then their runs interleaved (plain, int4, ..., plain, int4, ...):
        # these machines' speed drifts within minutes, and one configuration after another would
        # measure the drift as much as the configurations.
        llamas = {config: build(ckpt_dir, tokenizer, config, compile_, 1024, args.speculative_tokens)
                  for config in configs}
        for name in args.prompts:
            prompt = llamas["plain"].formatter.encode_dialog_prompt([{"role": "user", "content": PROMPTS[name]}])
            for llama in llamas.values():
                decode_rate(llama, prompt, 8)  # warm-up (and the compilation)
            before = {config: dict(llama.engine.counters) for config, llama in llamas.items()}
            rates = {config: [] for config in configs}
            decoded = dict.fromkeys(configs, 0)
            for _ in range(args.runs):
                for config, llama in llamas.items():
                    rate, tokens = decode_rate(llama, prompt, args.new_tokens)
                    rates[config].append(rate)
                    decoded[config] += len(tokens) - 1  # after the prefill's token
                    if config == "plain":
                        plain_tokens = tokens
                    elif tokens != plain_tokens:
                        raise AssertionError(f"{mode} {config} on {name}: greedy tokens differ from plain decoding's")
            for config, llama in llamas.items():
                counters = llama.engine.counters
                drafted = counters["draft_tokens"] - before[config]["draft_tokens"]
                accepted = counters["accepted_tokens"] - before[config]["accepted_tokens"]
                passes = counters["steps"] - before[config]["steps"]
                rate = statistics.median(rates[config])
                speedup = rate / statistics.median(rates["plain"])
                row = {"mode": mode, "config": config, "prompt": name, "tok_s": rate, "runs": rates[config],
                       "speedup": speedup, "drafted": drafted, "accepted": accepted,
                       "tokens_per_pass": decoded[config] / max(passes, 1), "threads": args.threads}
                results.append(row)
                acceptance = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "-"
                print(f"| {mode} | {config} | {name} | {rate:.1f} | {speedup:.2f}x | {acceptance} | "
                      f"{row['tokens_per_pass']:.2f} |", flush=True)
        del llamas
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "new_tokens": args.new_tokens,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

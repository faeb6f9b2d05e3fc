"""Streamed weight bandwidth of the matmul kernels a decode step can use, per weight shape and row count.

    python -m bench.linear_kernels [--rows 1,5,8] [--shapes wqkv,wo,w13,w2,output] [--threads 2]

For each of SmolLM2-135M's weight shapes (projections fused as the library loads them), enough
copies of the weight to far exceed the caches (~300 MB of fp32) are applied to the same activations,
so each call streams its weight from memory as a decode step does. In one process, median of 5
calls after a warm-up, for each weight format, PyTorch's kernel against `llama.kernels`:

  fp32   F.linear (MKL's sgemv/sgemm: what eager PyTorch and transformers run)  vs  linear_f32
  int8   aten._weight_int8pack_mm, bf16 activations (its fast path; a scale per row: it takes only
         the first of each row's)                                          vs  linear_int8, groups of 32
  int4   aten._weight_int4pack_mm_for_cpu, groups of 32, bf16 activations      vs  linear_int4

and, for reference, a plain `sum()` over a 256 MiB fp32 tensor: the memory's read bandwidth.
Reported as GB/s of weight bytes read (int4: 4.5 bits a weight with its scales and zeros) and the
ratio ours / PyTorch's. Rows: 1 is a batch-1 decode step, 5 a speculative verify pass of 4 drafts,
8 a batch-8 step.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.meters import machine_info
from llama import kernels
from llama.quantize.kernels import INT8_GROUP_SIZE, quantize_int4_groups, quantize_int8_groups, unpack_nibbles

SHAPES = {  # name: (out_features N, in_features K) of SmolLM2-135M's weights, as loaded (fused)
    "wqkv": (960, 576),
    "wo": (576, 576),
    "w13": (3072, 576),
    "w2": (576, 1536),
    "output": (49152, 576),
}
STREAMED_BYTES = 300e6  # fp32 bytes per call, summed over the copies: far more than any cache
GROUP_SIZE = 32


def seconds_per_call(fn, runs: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def formats(weights: list) -> dict:
    """Per format: (bytes per weight, PyTorch's call, ours) over every copy, each a function of x."""
    int8 = [quantize_int8_groups(w, INT8_GROUP_SIZE) for w in weights]  # the library's int8
    int4 = [quantize_int4_groups(w, GROUP_SIZE) for w in weights]  # (nibbles, (G, N, 2) bf16)
    tinygemm = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).int(), 1) for q, _ in int4]
    blocks = [(kernels.pack_int4_blocks(unpack_nibbles(q)), kernels.pack_int4_scales(sz)) for q, sz in int4]
    return {
        "fp32": (4, lambda x: [F.linear(x, w) for w in weights],
                 lambda x: [kernels.linear_f32(x, w) for w in weights]),
        "int8": (1 + 2 / INT8_GROUP_SIZE,
                 lambda x: [torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s[:, 0]) for q, s in int8],
                 lambda x: [kernels.linear_int8(x, q, s, INT8_GROUP_SIZE) for q, s in int8]),
        "int4": (0.5 + 4 / GROUP_SIZE,
                 lambda x: [torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), q, GROUP_SIZE, sz)
                            for q, (_, sz) in zip(tinygemm, int4)],
                 lambda x: [kernels.linear_int4(x, q, sz, GROUP_SIZE) for q, sz in blocks]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,5,8", help="rows of activations, comma-separated (default 1,5,8)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"from {','.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit("llama.kernels cannot run on this machine (see the log): nothing to compare")

    big = torch.ones(2**26)  # 256 MiB fp32
    read = big.nbytes / seconds_per_call(big.sum)
    del big
    machine = machine_info(torch.device("cpu"), torch.get_num_threads())
    print(f"{machine['cpu']} ({machine['cpu_capability']}), {machine['threads']} threads, torch {machine['torch']}; "
          f"plain read (sum over 256 MiB): {read / 1e9:.1f} GB/s\n")
    print("| weight (N × K) | format | rows | PyTorch GB/s | llama.kernels GB/s | ours / PyTorch | ours % of read |")
    print("|---|---|---|---|---|---|---|")
    rows = [int(r) for r in args.rows.split(",")]
    with torch.inference_mode():
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            copies = max(2, int(STREAMED_BYTES // (n * k * 4)))
            weights = [torch.randn(n, k) / k**0.5 for _ in range(copies)]
            for label, (bytes_per_weight, theirs, ours) in formats(weights).items():
                streamed = n * k * copies * bytes_per_weight
                for m in rows:
                    x = torch.randn(m, k)
                    their_speed = streamed / seconds_per_call(lambda: theirs(x))
                    our_speed = streamed / seconds_per_call(lambda: ours(x))
                    print(f"| {name} ({n} × {k}) | {label} | {m} | {their_speed / 1e9:.1f} | {our_speed / 1e9:.1f} "
                          f"| {our_speed / their_speed:.2f}× | {our_speed / read:.0%} |", flush=True)


if __name__ == "__main__":
    main()

"""Streamed weight bandwidth of the fp32 linear kernels a decode step can use, per weight shape.

    python -m bench.linear_kernels [--batch 1] [--shapes wq,w1,w2,output]

For each of SmolLM2-135M's weight shapes, a module holding enough copies of the
weight to far exceed the caches (85–300 MB) applies every copy to the same
activations, so each call streams its weight from memory as a decode step does.
Three ways to run it, in one process, median of 5 calls after a warm-up:

  eager      F.linear, i.e. MKL's sgemm/sgemv (what eager decoding and transformers run)
  compiled   torch.compile of F.linear (inductor calls MKL's matmul)
  reduction  torch.compile of `llama.parallel.linear`, what the library's compiled decode
             step runs: for one row, a multiply-and-sum that inductor generates as one
             vectorized loop over the weight's rows (`streamed_matmul`); for more, F.linear

and, for reference, a plain `sum()` over a 256 MiB fp32 tensor: the memory's read
bandwidth. Reported as GB/s of weight bytes and as a ratio to eager.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from llama.parallel import linear

SHAPES = {  # name: (out_features N, in_features K) of SmolLM2-135M's weights
    "wq": (576, 576),
    "w1": (1536, 576),
    "w2": (576, 1536),
    "output": (49152, 576),
}
STREAMED_BYTES = 300e6  # per call, summed over the copies: far more than any cache
MAX_COPIES = 64  # each copy is a graph constant to compile: keeps compilation to about a minute a shape


class ManyLinears(nn.Module):
    """`copies` weights of one shape, each applied to the same input: one call streams them all."""

    def __init__(self, out_features: int, in_features: int, copies: int, matmul=F.linear):
        super().__init__()
        self.matmul = matmul
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5, requires_grad=False)
            for _ in range(copies)
        )

    def forward(self, x: torch.Tensor) -> list:
        return [self.matmul(x, w) for w in self.weights]


def seconds_per_call(fn, x: torch.Tensor, runs: int = 5) -> float:
    fn(x)  # warm-up (and compilation)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="rows of activations (default 1: batch-1 decoding)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"from {','.join(SHAPES)}")
    args = parser.parse_args(argv)

    big = torch.ones(2**26)  # 256 MiB fp32
    read = big.nbytes / seconds_per_call(torch.sum, big)
    del big
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}; "
          f"plain read (sum over 256 MiB): {read / 1e9:.1f} GB/s\n")
    print("| weight (N × K) | copies | eager GB/s | compiled GB/s | reduction GB/s | reduction / eager |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            copies = min(MAX_COPIES, max(2, int(STREAMED_BYTES // (n * k * 4))))
            module = ManyLinears(n, k, copies).eval()
            reduction = ManyLinears(n, k, copies, matmul=linear).eval()
            reduction.weights = module.weights  # the same weights
            x = torch.randn(args.batch, k)
            streamed = n * k * 4 * copies
            speeds = {
                label: streamed / seconds_per_call(fn, x)
                for label, fn in (("eager", module), ("compiled", torch.compile(module, fullgraph=True)),
                                  ("reduction", torch.compile(reduction, fullgraph=True)))
            }
            torch._dynamo.reset()
            print(f"| {name} ({n} × {k}) | {copies} | {speeds['eager'] / 1e9:.1f} | {speeds['compiled'] / 1e9:.1f} "
                  f"| {speeds['reduction'] / 1e9:.1f} | {speeds['reduction'] / speeds['eager']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

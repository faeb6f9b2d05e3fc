"""Benchmarks of the `llama` package against its peers.

    python -m bench.bench            # speed and memory against transformers, llama.cpp, Meta's reference
    python -m bench.serve_load       # load test of the OpenAI-compatible server
    python -m bench.linear_kernels   # MKL against inductor's GEMM, per weight shape

`bench.py` runs the comparison out of four modules: `meters.py` (memory, bandwidth, the
machine), `engines.py` (ours and the peers, one interface), `worker.py` (one engine per
subprocess, spec and results as JSON) and `report.py` (markdown tables, the plot).
"""

import sys


def log(message: str):
    """Progress on stderr, so that stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)

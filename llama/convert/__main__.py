"""Command line: python -m llama.convert SRC DST [--model-parallel N] [--dtype D]
                 python -m llama.convert --reshard SRC DST --model-parallel M"""

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from llama.checkpoint import reshard
from llama.convert import convert
from llama.distributed import choose_dtype

import torch


def progress_bar(description: str):
    # Shown only once the work has taken more than a second.
    return lambda items: tqdm(items, desc=description, unit="tensor", delay=1.0, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.convert",
        description="Convert a Hugging Face Llama directory or a GGUF file into a Meta-format checkpoint "
        "(params.json, consolidated.NN.pth, tokenizer files), or reshard a Meta-format checkpoint.",
    )
    parser.add_argument("src", type=Path, help="Hugging Face model directory, .gguf file, or (--reshard) Meta checkpoint")
    parser.add_argument("dst", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--model-parallel", type=int, default=1, metavar="N", help="number of shards to write (1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the source's; GGUF dequantizes to float32)")
    parser.add_argument("--reshard", action="store_true", help="SRC is a Meta-format checkpoint: rewrite it as N shards")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_parallel < 1:
        raise SystemExit("--model-parallel must be >= 1")
    start = time.perf_counter()
    try:
        if args.reshard:
            if args.dtype:
                raise SystemExit("--reshard copies tensors bit for bit; --dtype does not apply")
            reshard(args.src, args.dst, args.model_parallel, progress=progress_bar("resharding"))
        else:
            dtype = choose_dtype(torch.device("cpu"), args.dtype) if args.dtype else None
            convert(args.src, args.dst, args.model_parallel, dtype, progress=progress_bar("converting"))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.error(str(e))  # a wrong source, destination or shard count: status 2, no traceback
    print(f"wrote {args.dst} ({args.model_parallel} shard(s)) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

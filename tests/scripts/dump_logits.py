"""Run under torchrun (or plain python): build a checkpoint and save the logits of fixed tokens (rank 0)."""

import sys

import torch

from llama import Llama
from llama.distributed import is_main_process


def main(ckpt_dir: str, tokens_path: str, out_path: str):
    tokens = torch.load(tokens_path)
    llama = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=64, max_batch_size=len(tokens),
                        device="cpu")
    with torch.no_grad():
        logits = llama.model(tokens, 0)
    if is_main_process():
        torch.save(logits, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])

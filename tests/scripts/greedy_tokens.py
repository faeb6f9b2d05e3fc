"""Run under torchrun (or plain python): greedy-decode fixed prompts and write the tokens as JSON (rank 0).

    greedy_tokens.py CKPT_DIR TOKENIZER OUT.json [SPECULATIVE]   (SPECULATIVE: Llama.build's speculative=)
"""

import json
import sys
from typing import Optional

from llama import Llama
from llama.distributed import is_main_process

PROMPTS = [[128000, 791, 6864, 315], [128000, 40], [128000, 9906, 11, 1268, 527, 499, 30, 358]]


def main(ckpt_dir: str, tokenizer_path: str, out_path: str, speculative: Optional[str] = None):
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu",
                        speculative=speculative)
    tokens, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    # top_k: the tiny random model's next-token distribution is nearly flat over 128k tokens, where
    # summing a row-parallel matmul in two halves (rounding ~1e-7) reorders near-tied probabilities
    # and moves a draw; among the top 8 such ties do not decide.
    sampled, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0.8, top_p=0.95, top_k=8)
    if is_main_process():
        with open(out_path, "w") as f:
            json.dump({"greedy": tokens, "sampled": sampled, "drafted": llama.engine.counters["draft_tokens"]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

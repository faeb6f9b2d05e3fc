"""Run under torchrun (or plain python) on a Llama-2-shaped checkpoint with a SentencePiece
tokenizer: write rank 0's greedy and sampled tokens, chat answers and embedding split as JSON."""

import json
import sys

import torch.distributed as dist

from llama import Llama
from llama.distributed import is_main_process

PROMPTS = ["The quick brown fox", "Paris", "def f(x):\n    return"]
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ],
]


def main(ckpt_dir: str, tokenizer_path: str, out_path: str):
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu")
    prompt_tokens = [llama.tokenizer.encode(prompt, bos=True, eos=False) for prompt in PROMPTS]
    greedy, _ = llama.generate(prompt_tokens, max_gen_len=12, temperature=0)
    sampled, _ = llama.generate(prompt_tokens, max_gen_len=12, temperature=0.8, top_p=0.95)
    chat = llama.chat_completion(DIALOGS, max_gen_len=8, temperature=0)
    if is_main_process():
        with open(out_path, "w") as f:
            json.dump(
                {
                    "embedding_split": llama.model.params.embedding_split,
                    "greedy": greedy,
                    "sampled": sampled,
                    "chat": [prediction["generation"]["content"] for prediction in chat],
                },
                f,
            )
    # Leave the group before exiting: a gloo group left to interpreter shutdown
    # sometimes aborts the process (SIGABRT, "terminate called without an active exception").
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Text completion with a pretrained Llama, as in Meta's reference example.

    python example_text_completion.py                         # the bundled SmolLM2-135M-Instruct
    python example_text_completion.py CKPT_DIR [TOKENIZER_PATH]
    torchrun --nproc_per_node N example_text_completion.py CKPT_DIR TOKENIZER_PATH   # N shards
"""

import logging
import os
from typing import List, Optional

import fire

from llama import Llama
from llama.options import resolve_checkpoint, set_threads


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    stream: bool = True,
    threads: Optional[int] = None,
):
    """Continues a few prompts; only rank 0 prints.

    stream: print each continuation as it is generated, one prompt after the
    other; --stream False continues the prompts as one batch, as the reference does.
    threads: torch's intra-op threads (default: $OMP_NUM_THREADS if set, else one per
    physical core; see llama.options.set_threads).
    """
    is_rank0 = int(os.environ.get("RANK", 0)) == 0
    if is_rank0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(threads)
    # No ckpt_dir: the bundled default model, provisioned on first use; no tokenizer_path: CKPT_DIR/tokenizer.model.
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )

    prompts: List[str] = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if stream:
        for prompt in prompts:
            show(f"{prompt}\n> ", is_rank0, end="")
            for piece in generator.stream(prompt, **options):  # every rank runs the loop; rank 0 prints
                show(piece, is_rank0, end="")
            show("\n\n==================================\n", is_rank0)
        return

    results = generator.text_completion(prompts, **options)
    for prompt, result in zip(prompts, results):
        show(f"{prompt}\n> {result['generation']}\n\n==================================\n", is_rank0)


def show(text: str, is_rank0: bool, end: str = "\n"):
    """Prints on rank 0 only."""
    if is_rank0:
        print(text, end=end, flush=True)


if __name__ == "__main__":
    fire.Fire(main)

"""Chat with a pretrained, instruction-tuned Llama, as in Meta's reference example.

    python example_chat_completion.py                         # the bundled SmolLM2-135M-Instruct
    python example_chat_completion.py CKPT_DIR [TOKENIZER_PATH]
    torchrun --nproc_per_node N example_chat_completion.py CKPT_DIR TOKENIZER_PATH   # N shards
"""

import logging
import os
from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.options import resolve_checkpoint, set_threads


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    stream: bool = True,
    threads: Optional[int] = None,
):
    """Answers a few dialogs; only rank 0 prints.

    max_gen_len defaults to max_seq_len - 1 (as long as the context allows).
    stream: print each answer as it is generated, one dialog after the other;
    --stream False answers the dialogs as one batch, as the reference does.
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

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",  # noqa: E501
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {"role": "system", "content": "Always answer with emojis"},
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
    ]
    options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if stream:
        for dialog in dialogs:
            show(dialog, is_rank0)
            show("> Assistant: ", is_rank0, end="")
            for piece in generator.stream(dialog, **options):  # every rank runs the loop; rank 0 prints
                show(piece, is_rank0, end="")
            show("\n\n==================================\n", is_rank0)
        return

    results = generator.chat_completion(dialogs, **options)
    for dialog, result in zip(dialogs, results):
        show(dialog, is_rank0)
        show(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}", is_rank0)
        show("\n==================================\n", is_rank0)


def show(what, is_rank0: bool, end: str = "\n"):
    """Prints a dialog's messages, or a piece of text, on rank 0 only."""
    if not is_rank0:
        return
    if isinstance(what, str):
        print(what, end=end, flush=True)
        return
    for msg in what:
        print(f"{msg['role'].capitalize()}: {msg['content']}\n")


if __name__ == "__main__":
    fire.Fire(main)

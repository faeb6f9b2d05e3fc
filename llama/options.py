"""The model options every entry point shares, and the command-line helpers they need.

    --ckpt-dir, --tokenizer     the checkpoint (default: the bundled SmolLM2-135M-Instruct)
    --device, --dtype           where and in what precision the weights live
    --quantize, --compile       optional transforms of the loaded model
    --speculative, --draft      speculative decoding (`llama.engine.speculative`)
    --threads                   torch's intra-op threads (default: one per physical core)
    --max-seq-len, --max-batch-size   the KV cache's size

`llama chat`, `llama complete` and `llama serve` add them with `add_model_options`,
check them with `check_model_options` and load the model with `build_llama`; the
example scripts, which keep Meta's positional signature, use `resolve_checkpoint`
and `set_threads` directly.
"""

import argparse
import os
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from llama.default_model import ensure_default_model
from llama.generation import Llama
from llama.quantize import MODES

SYSFS_CPUS = Path("/sys/devices/system/cpu")  # Linux's CPU topology, what `lscpu` reads
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def physical_cores() -> int:
    """The physical cores this process may run on: the hyperthreads of one core count once.

    Falls back to the logical CPUs where the topology cannot be read (not Linux).
    """
    try:
        cpus = os.sched_getaffinity(0)  # the CPUs this process may use, not all the machine's
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = SYSFS_CPUS / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)


def set_threads(threads: Optional[int]) -> None:
    """Sets torch's intra-op threads for the whole process: what an entry point's --threads asked for.

    Args:
        threads: the number of threads; None leaves $OMP_NUM_THREADS in charge where it is
            set (torch reads it; torchrun sets it to 1 for several ranks per node), else
            uses one thread per physical core this process may run on.

    More threads than free cores is oversubscription: OpenMP's threads spin while they wait
    for each other, and on a machine other processes keep busy a decode step waits for
    the slowest. There, fewer threads than cores (or OMP_WAIT_POLICY=PASSIVE in the
    environment, read when torch starts) can be many times faster.

    The library never calls this: it is the command line's choice, not a module's.
    """
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(physical_cores() if threads is None else threads)


def unescape(text: str) -> str:
    """Decodes the escapes a person types on a command line: `\\n`, `\\t`, `\\r` and `\\\\`.

    `--stop "\\n"` reaches the program as a backslash and an `n`; this makes it a newline.
    Other backslashes stay as typed (`C:\\dir`), and so does every other character,
    non-ASCII included (`codecs.decode(s, "unicode_escape")` would read "é" as Latin-1 bytes).
    """
    return re.sub(r"\\([nrt\\])", lambda match: ESCAPES[match.group(1)], text)


def add_model_options(
    parser: argparse.ArgumentParser, *, max_batch_size: int, max_seq_len: int = 2048
) -> argparse._ArgumentGroup:
    """Adds the "model" option group to `parser`, with this command's default KV-cache size.

    Returns the group, for a command's own model options (the server's --model-name).
    """
    model = parser.add_argument_group("model")
    model.add_argument("--ckpt-dir", type=Path, help="Meta-format checkpoint directory "
                       "(default: the bundled SmolLM2-135M-Instruct, provisioned on first use)")
    model.add_argument("--tokenizer", type=Path, help="tokenizer file (default: CKPT_DIR/tokenizer.model)")
    model.add_argument("--device", help="default: this rank's GPU if there is one, else the CPU")
    model.add_argument("--dtype", help="e.g. float32, bfloat16 (default: bfloat16 on GPUs, float32 on the CPU)")
    model.add_argument("--quantize", choices=MODES, help="quantize the weights after loading")
    model.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile (the first generation pays for it)")
    model.add_argument("--speculative", choices=("int4", "int8", "prompt-lookup"),
                       help="speculative decoding: draft with the model's own weights quantized, or with n-gram "
                            "lookup in the text so far (greedy output unchanged)")
    model.add_argument("--draft", type=Path, help="speculative decoding with this draft checkpoint (same tokenizer)")
    model.add_argument("--speculative-tokens", type=int,
                       help="draft tokens per round (default: 4 for model drafts, 15 for prompt lookup)")
    model.add_argument("--threads", type=int, help="torch's intra-op threads (default: $OMP_NUM_THREADS if set, "
                       f"else one per physical core: {physical_cores()} here)")
    model.add_argument("--max-seq-len", type=int, default=max_seq_len,
                       help=f"longest prompt + answer in tokens; sizes the KV cache (default {max_seq_len})")
    model.add_argument("--max-batch-size", type=int, default=max_batch_size,
                       help=f"most sequences generated at once; sizes the KV cache (default {max_batch_size})")
    return model


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with status 2 and a usage message if a model option is out of range; loads nothing."""
    for option in ("max_seq_len", "max_batch_size", "threads", "speculative_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.ckpt_dir is not None and not args.ckpt_dir.is_dir():
        parser.error(f"--ckpt-dir {args.ckpt_dir} is not a directory")
    if args.draft is not None and not args.draft.is_dir():
        parser.error(f"--draft {args.draft} is not a directory")
    if args.draft is not None and args.speculative is not None:
        parser.error("--draft is a draft checkpoint, --speculative a draft made from the model: pass one")
    tokenizer = args.tokenizer or (args.ckpt_dir / "tokenizer.model" if args.ckpt_dir else None)
    if tokenizer is not None and not tokenizer.is_file():
        parser.error(f"tokenizer {tokenizer} not found: pass --tokenizer PATH")


def resolve_checkpoint(
    ckpt_dir: Optional[Union[str, Path]], tokenizer: Optional[Union[str, Path]] = None
) -> Tuple[Path, Path]:
    """(ckpt_dir, tokenizer path) for `Llama.build`.

    Args:
        ckpt_dir: the checkpoint directory; None is the bundled default model, provisioned on first use.
        tokenizer: the tokenizer file; None is `tokenizer.model` in the checkpoint directory.
    """
    ckpt_dir = ensure_default_model()[0] if ckpt_dir is None else Path(ckpt_dir)
    return ckpt_dir, Path(tokenizer) if tokenizer is not None else ckpt_dir / "tokenizer.model"


def build_llama(args: argparse.Namespace, *, seed: int = 1) -> Llama:
    """Sets torch's threads (`set_threads`), then loads the `Llama` the model options describe.

    Args:
        args: parsed options of a parser given `add_model_options`.
        seed: seed of the sampling generator.

    Raises:
        FileNotFoundError, ValueError: from `Llama.build`, for a checkpoint that cannot be loaded as asked.
    """
    set_threads(args.threads)
    ckpt_dir, tokenizer = resolve_checkpoint(args.ckpt_dir, args.tokenizer)
    return Llama.build(ckpt_dir, tokenizer, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                       seed=seed, device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
                       speculative=args.speculative, draft=args.draft, speculative_tokens=args.speculative_tokens)

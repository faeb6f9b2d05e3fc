"""Conversion of other checkpoint formats into Meta's, and resharding.

    python -m llama.convert SRC DST [--model-parallel N] [--dtype bfloat16]
    python -m llama.convert --reshard SRC DST --model-parallel M

SRC is a Hugging Face model directory (config.json + *.safetensors +
tokenizer.json) or a GGUF file. Every source is read through the same small
interface, `Source`, and written by `llama.checkpoint.write_checkpoint` one
shard at a time.
"""

import logging
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Protocol

import torch

from llama.checkpoint import write_checkpoint
from llama.model import ffn_hidden_dim

logger = logging.getLogger(__name__)


class Source(Protocol):
    """A model in some format, seen as Meta's tensors."""

    params: dict  # Meta's params.json
    tensor_names: List[str]  # Meta's tensor names

    def load(self, name: str) -> torch.Tensor:
        """The whole-model tensor `name` in Meta's layout (rotary pairs interleaved)."""

    def write_tokenizer(self, directory: Path) -> None:
        """Writes tokenizer.model and tokenizer_config.json into `directory`."""


def open_source(src: Path) -> Source:
    if src.is_dir():
        from llama.convert.hf import HuggingFaceSource

        return HuggingFaceSource(src)
    if src.is_file():
        from llama.convert.gguf import GGUFSource

        return GGUFSource(src)
    raise FileNotFoundError(f"no model at {src}: expected a Hugging Face model directory or a .gguf file")


def convert(
    src: Path,
    dst: Path,
    model_parallel: int = 1,
    dtype: Optional[torch.dtype] = None,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> None:
    """Converts a Hugging Face directory or GGUF file at `src` into a Meta-format checkpoint at `dst`.

    dtype: of the written weights; defaults to the source's (GGUF quantized
    weights are dequantized to float32).

    Raises:
        ValueError: the source is not a Llama this library runs, or (before
            anything is written) model_parallel ranks cannot split its heads.
    """
    source = open_source(Path(src))
    logger.info("converting %s (%d tensors) into %d shard(s) at %s", src, len(source.tensor_names), model_parallel, dst)
    write_checkpoint(
        Path(dst),
        source.params,
        source.tensor_names,
        source.load,
        model_parallel,
        dtype=dtype,
        extra_files=source.write_tokenizer,
        progress=progress,
    )


def meta_tensor_names(n_layers: int) -> List[str]:
    layer = [
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight",
    ]  # fmt: skip
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{name}" for i in range(n_layers) for name in layer]
    return names + ["norm.weight", "output.weight"]


def ffn_params(dim: int, hidden_dim: int) -> dict:
    """params.json keys (multiple_of, ffn_dim_multiplier) for which Meta's rule gives `hidden_dim`.

    The rule is `llama.model.ffn_hidden_dim`'s (the width of FeedForward).
    """
    base = int(2 * 4 * dim / 3)
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden_dim % multiple_of:
            continue
        for multiplier in (None, round(hidden_dim / base, 4), hidden_dim / base):
            if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise ValueError(f"no multiple_of / ffn_dim_multiplier gives a feed-forward size {hidden_dim} for dim {dim}")


def unpermute_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q/k rows -> Meta's.

    HF rotates halves of each head, pairs (j, j + hd/2); Meta rotates interleaved
    pairs (2j, 2j + 1). Row j and row j + hd/2 of each HF head become rows 2j, 2j+1.
    """
    out_features, in_features = weight.shape  # (n_heads * hd, dim)
    head_dim = out_features // n_heads
    return weight.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)

"""Meta-format checkpoints: `params.json` + `consolidated.NN.pth`, one shard per model-parallel rank.

Loading never runs code from the checkpoint (`weights_only=True`), maps the
shard into memory instead of reading it (`mmap=True`), and builds the model
without allocating weights of its own, so peak host memory stays near one
copy of the shard.
"""

import contextlib
import json
import logging
import pickle
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama.model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# Keys some Meta checkpoints carry that the model recomputes (Llama 2's rotary table).
IGNORED_KEYS = {"rope.freqs"}


def find_shards(ckpt_dir: Path) -> List[Path]:
    """The checkpoint's shards in rank order: consolidated.00.pth, consolidated.01.pth, ..."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise FileNotFoundError(
            f"no *.pth checkpoint shard in {ckpt_dir}; expected consolidated.00.pth ... (Meta's format)"
        )
    return shards


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in {ckpt_dir}; a Meta-format checkpoint directory needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_shard(path: Path) -> StateDict:
    """Maps one shard into memory. Refuses pickles that hold anything but tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint "
            f"(loading it would have to run code from the file). Details: {e}"
        ) from e
    except RuntimeError as e:
        raise ValueError(f"cannot read checkpoint shard {path}: {e}") from e


# fairscale splits each weight across ranks along one dimension (None: replicated).
#   ColumnParallelLinear (wq, wk, wv, w1, w3, output) splits its outputs: dim 0.
#   RowParallelLinear (wo, w2) splits its inputs: dim 1.
#   VocabParallelEmbedding (tok_embeddings) splits the vocabulary: dim 0.
#   RMSNorm weights are replicated.
_SHARD_DIM_BY_SUFFIX = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "tok_embeddings.weight": 0,
    "output.weight": 0,
}


def shard_dim(name: str) -> Optional[int]:
    """The dimension along which fairscale splits parameter `name`, or None if every rank holds it whole."""
    for suffix, dim in _SHARD_DIM_BY_SUFFIX.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def split_state_dict(state: StateDict, n_shards: int) -> List[StateDict]:
    """Splits a whole-model state dict into the n_shards that n_shards ranks load."""
    shards: List[StateDict] = [{} for _ in range(n_shards)]
    for name, tensor in state.items():
        dim = shard_dim(name)
        if dim is None:
            pieces = [tensor] * n_shards
        else:
            if tensor.shape[dim] % n_shards != 0:
                raise ValueError(f"{name} {tuple(tensor.shape)} cannot be split in {n_shards} along dim {dim}")
            pieces = tensor.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()  # own storage, so saving one shard saves only its piece
    return shards


def merge_state_dicts(shards: Sequence[StateDict]) -> StateDict:
    """The inverse of split_state_dict: concatenates shards back into the whole model."""
    merged: StateDict = {}
    for name in shards[0]:
        dim = shard_dim(name)
        merged[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return merged


@contextlib.contextmanager
def _skip_fairscale_init() -> Iterator[None]:
    """fairscale fills each weight when its layer is built (and, when sharded,
    first builds the full unsharded weight on every rank). The checkpoint is
    about to replace those weights, so skip that work and memory."""
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def load_model(shard_path: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Builds the Transformer for this rank and loads its shard into it.

    Raises:
        ValueError: the shard's keys or shapes do not match the model that
            params.json describes (names the keys).
    """
    state = load_shard(shard_path)
    for key in IGNORED_KEYS & state.keys():
        del state[key]

    # Weights are allocated but never written (fairscale) or not allocated at
    # all (meta device) until the shard's tensors are assigned in their place.
    with torch.device("meta"), _skip_fairscale_init():
        model = Transformer(args)

    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {shard_path} does not match the model in params.json: "
            f"missing keys {_abbreviate(missing)}, unexpected keys {_abbreviate(unexpected)}"
        )
    wrong_shapes = [
        f"{name}: checkpoint {tuple(state[name].shape)}, model {shape}"
        for name, shape in expected.items()
        if tuple(state[name].shape) != shape
    ]
    if wrong_shapes:
        raise ValueError(
            f"checkpoint {shard_path} has shapes that params.json and the model-parallel size do not give: "
            f"{_abbreviate(wrong_shapes)}"
        )

    state = {name: t.to(device=device, dtype=dtype) if t.is_floating_point() else t for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    return model


def _abbreviate(items: Sequence[str], limit: int = 8) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"

"""Meta-format checkpoints: `params.json` + `consolidated.NN.pth`, one shard per model-parallel rank.

Loading never runs code from the checkpoint (`weights_only=True`), maps the
shard into memory instead of reading it (`mmap=True`), and builds the model
without allocating weights of its own, so peak host memory stays near one
copy of the shard; `load_model` is the one loader, quantized checkpoints
included (through its `transform`).

Every writer (conversion, resharding, `python -m llama.quantize`) fills a
`directory_when_complete`, writes its shards under `shard_file_name` and
takes the tokenizer files along with `copy_side_files`.
"""

import contextlib
import json
import logging
import math
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Optional, Sequence

import fairscale.nn.model_parallel.layers as fs_layers
import safetensors
import safetensors.torch
import torch

from llama.distributed import available_memory
from llama.model import KVCache, ModelArgs, Transformer, ffn_hidden_dim

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# Keys some Meta checkpoints carry that the model recomputes (Llama 2's rotary table).
IGNORED_KEYS = {"rope.freqs"}

# Every file with one of these endings is a shard; for the same stem, the later ending wins.
SHARD_SUFFIXES = (".pth", ".safetensors")


def shard_file_name(rank: int) -> str:
    """The name this library writes rank `rank`'s shard under (torch.save's pickle format)."""
    return f"consolidated.{rank:02d}.pth"


def _shard_files(ckpt_dir: Path) -> List[Path]:
    """Every file `find_shards` may pick, .pth before .safetensors."""
    return [path for suffix in SHARD_SUFFIXES for path in sorted(ckpt_dir.glob(f"*{suffix}"))]


def find_shards(ckpt_dir: Path) -> List[Path]:
    """The checkpoint's shards in rank order: consolidated.00.pth, consolidated.01.pth, ...

    A shard saved as safetensors (consolidated.00.safetensors) is preferred to
    the .pth of the same name: it cannot hold code at all.
    """
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    shards = {path.stem: path for path in _shard_files(ckpt_dir)}
    if not shards:
        raise FileNotFoundError(
            f"no *.pth or *.safetensors checkpoint shard in {ckpt_dir}; expected consolidated.00.pth ... (Meta's format)"
        )
    return [shards[stem] for stem in sorted(shards)]


def read_params(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in {ckpt_dir}; a Meta-format checkpoint directory needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def write_params(ckpt_dir: Path, params: dict) -> None:
    (ckpt_dir / "params.json").write_text(json.dumps(params, indent=2))


def load_shard(path: Path) -> StateDict:
    """Maps one shard into memory. Refuses pickles that hold anything but tensors and plain containers."""
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)  # mapped, not read, until a tensor is used
        except (safetensors.SafetensorError, OSError) as e:
            raise ValueError(f"cannot read checkpoint shard {path}: {e}") from e
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
#   tok_embeddings: VocabParallelEmbedding (Llama 3) splits the vocabulary, dim 0;
#   ParallelEmbedding (Llama 2) splits the embedding, dim 1.
#   RMSNorm weights are replicated.
_SHARD_DIM_BY_SUFFIX = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
}
EMBEDDING_SPLIT_DIM = {"vocab": 0, "dim": 1}


def shard_dim(name: str, embedding_split: str = "vocab") -> Optional[int]:
    """The dimension along which fairscale splits parameter `name`, or None if every rank holds it whole."""
    if name == "tok_embeddings.weight":
        return EMBEDDING_SPLIT_DIM[embedding_split]
    for suffix, dim in _SHARD_DIM_BY_SUFFIX.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def check_shard_count(params: dict, n_shards: int, embedding_split: str = "vocab") -> None:
    """Raises ValueError, naming the shard counts that work, unless `n_shards` ranks can share
    every size that fairscale splits: the query and key/value heads, the feed-forward width, the
    vocabulary (output projection) and, for an embedding split along it, the model dim.

    A vocab_size of -1 (Llama 2: the tokenizer's) is checked when its tensors are split.
    """
    if n_shards < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n_shards}")
    args = ModelArgs.from_params(params)
    split = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "feed-forward width": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
    }
    if args.vocab_size > 0:
        split["vocab_size"] = args.vocab_size
    if embedding_split == "dim":
        split["dim"] = args.dim
    indivisible = [f"{name} ({size})" for name, size in split.items() if size % n_shards != 0]
    if indivisible:
        common = math.gcd(*split.values())
        works = [str(n) for n in range(1, common + 1) if common % n == 0]
        choices = works[0] if len(works) == 1 else f"{', '.join(works[:-1])} or {works[-1]}"
        raise ValueError(
            f"cannot split this model into {n_shards} shards: each rank holds an equal part of "
            f"{', '.join(indivisible)}, which {n_shards} does not divide; shard counts that work: {choices}"
        )


def embedding_split_of(shard_embedding_shape: Sequence[int], dim: int) -> str:
    """Which way a shard's tok_embeddings was split, from its shape: (vocab / N, dim) or (vocab, dim / N)."""
    return "vocab" if shard_embedding_shape[1] == dim else "dim"


def shard_piece(name: str, tensor: torch.Tensor, rank: int, n_shards: int, embedding_split: str = "vocab"):
    """The part of a whole-model tensor that rank `rank` of `n_shards` holds."""
    dim = shard_dim(name, embedding_split)
    if dim is None or n_shards == 1:
        return tensor
    if tensor.shape[dim] % n_shards != 0:
        raise ValueError(f"{name} {tuple(tensor.shape)} cannot be split in {n_shards} along dim {dim}")
    return tensor.chunk(n_shards, dim=dim)[rank]


def split_state_dict(state: StateDict, n_shards: int, embedding_split: str = "vocab") -> List[StateDict]:
    """Splits a whole-model state dict into the n_shards that n_shards ranks load."""
    # clone: each shard owns its storage, so saving one shard saves only its piece.
    return [
        {name: shard_piece(name, t, rank, n_shards, embedding_split).clone() for name, t in state.items()}
        for rank in range(n_shards)
    ]


def merge_tensor(name: str, pieces: Sequence[torch.Tensor], embedding_split: str = "vocab") -> torch.Tensor:
    """The whole-model tensor from every rank's piece of it."""
    dim = shard_dim(name, embedding_split)
    return pieces[0] if dim is None or len(pieces) == 1 else torch.cat(list(pieces), dim=dim)


@contextlib.contextmanager
def directory_when_complete(dst: Path) -> Iterator[Path]:
    """A temporary sibling of `dst` to fill, renamed to `dst` at the end and removed on
    failure: the directory appears only when complete.

    Raises:
        FileExistsError: `dst` exists already.
    """
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private to the user
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path) -> None:
    """Copies the files of checkpoint directory `src` other than its shards and params.json
    (tokenizer files, licences) into directory `dst`.

    Every file that `find_shards` may pick stays behind, whether .pth or
    safetensors: next to new shards, an old one would be loaded in their place.
    """
    shards = set(_shard_files(src))
    for path in src.iterdir():
        if path.is_file() and path not in shards and path.name != "params.json":
            shutil.copy2(path, dst / path.name)


def write_checkpoint(
    dst: Path,
    params: dict,
    tensor_names: Sequence[str],
    load_tensor: Callable[[str], torch.Tensor],
    n_shards: int,
    dtype: Optional[torch.dtype] = None,
    embedding_split: str = "vocab",
    extra_files: Callable[[Path], None] = lambda directory: None,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> None:
    """Writes a Meta-format checkpoint directory, one shard at a time.

    Args:
        tensor_names: Meta names of every whole-model tensor.
        load_tensor: returns one whole-model tensor by name; called once per
            tensor and shard, so that only one shard is ever held in memory.
        extra_files: writes what else belongs in the directory (tokenizer files).
        progress: wraps the (shard, name) iteration, e.g. in a progress bar.

    The directory appears only when complete (`directory_when_complete`).

    Raises:
        ValueError: before anything is written, if n_shards ranks cannot split
            the model that `params` describe (`check_shard_count`).
        FileExistsError: dst exists already.
    """
    check_shard_count(params, n_shards, embedding_split)
    with directory_when_complete(dst) as tmp:
        write_params(tmp, params)
        extra_files(tmp)
        work = progress([(rank, name) for rank in range(n_shards) for name in tensor_names])
        shard: StateDict = {}
        for rank, name in work:
            tensor = load_tensor(name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            shard[name] = shard_piece(name, tensor, rank, n_shards, embedding_split).clone()
            if len(shard) == len(tensor_names):
                torch.save(shard, tmp / shard_file_name(rank))
                shard = {}


def reshard(src: Path, dst: Path, n_shards: int, embedding_split: Optional[str] = None, progress=None) -> None:
    """Rewrites an N-shard checkpoint as `n_shards` shards; tensors are copied bit for bit.

    embedding_split: how to split tok_embeddings in the output; defaults to the
    source's split, or for a 1-shard source "dim" for Llama 2 style params
    (vocab_size -1, as Meta's reference shards Llama 2) and "vocab" otherwise.
    """
    shard_paths = find_shards(src)
    params = read_params(src)
    if "quantization" in params:
        raise ValueError(
            f"{src} is quantized ({params['quantization']}): each shard has its own scales, so it cannot be "
            f"resharded; reshard the unquantized checkpoint, then quantize the result (python -m llama.quantize)"
        )
    shards = [load_shard(path) for path in shard_paths]
    names = list(shards[0])
    source_split = "vocab"
    if len(shards) > 1:
        source_split = embedding_split_of(shards[0]["tok_embeddings.weight"].shape, params["dim"])
    if embedding_split is None:
        embedding_split = source_split if len(shards) > 1 else ("dim" if params.get("vocab_size", -1) <= 0 else "vocab")
    write_checkpoint(
        dst, params, names,
        lambda name: merge_tensor(name, [s[name] for s in shards], source_split),
        n_shards, embedding_split=embedding_split, extra_files=lambda directory: copy_side_files(src, directory),
        **({"progress": progress} if progress else {}),
    )


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


# Changes the model that `load_model` builds on the meta device before the shard is assigned
# to it: swaps modules in place (quantized ones: `llama.quantize.skeleton_transform`), and
# returns the names of the floating tensors that keep the dtype they are stored in.
SkeletonTransform = Callable[[Transformer], Collection[str]]


def load_model(
    shard_path: Path,
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    transform: Optional[SkeletonTransform] = None,
) -> Transformer:
    """Builds the Transformer for this rank and loads its shard into it.

    Floating tensors are cast to `dtype`, except those that `transform` names;
    the others are moved to `device` as stored.

    Args:
        transform: for a shard of a changed model, e.g. a quantized one (see SkeletonTransform).

    Raises:
        ValueError: the shard's keys or shapes do not match the model that
            params.json describes (names the keys), or its KV cache would not fit.
    """
    state = read_shard_for(shard_path, args)
    # Weights are allocated but never written (fairscale) or not allocated at
    # all (meta device) until the shard's tensors are assigned in their place.
    with torch.device("meta"), _skip_fairscale_init():
        model = Transformer(args)
    keep_dtype = set(transform(model)) if transform is not None else set()

    check_state_matches(model, state, f"checkpoint {shard_path}")
    state = {name: t.to(device, dtype) if t.is_floating_point() and name not in keep_dtype else t.to(device)
             for name, t in state.items()}  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    check_cache_fits(model, device, dtype)
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    return model


def check_state_matches(model: torch.nn.Module, state: StateDict, source: str) -> None:
    """Raises ValueError naming the keys, shapes or integer dtypes in which `state` differs
    from `model`'s state dict. Floating tensors may differ in dtype: loaders cast them.

    source: what `state` was read from, for the message ("checkpoint <path>").
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model in params.json: "
            f"missing keys {_abbreviate(missing)}, unexpected keys {_abbreviate(unexpected)}"
        )
    wrong = []
    for name, want in expected.items():
        got = state[name]
        wrong_dtype = got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point())
        if got.shape != want.shape or wrong_dtype:
            dtypes = (f" {got.dtype}", f" {want.dtype}") if wrong_dtype else ("", "")
            wrong.append(f"{name}: checkpoint {tuple(got.shape)}{dtypes[0]}, model {tuple(want.shape)}{dtypes[1]}")
    if wrong:
        raise ValueError(
            f"{source} has shapes or integer types that params.json and the model-parallel size do not give: "
            f"{_abbreviate(wrong)}"
        )


def read_shard_for(shard_path: Path, args: ModelArgs) -> StateDict:
    """The shard's tensors without the keys the model does not use; records in `args`
    how its token embedding is split (read from its shape)."""
    state = load_shard(shard_path)
    for key in IGNORED_KEYS & state.keys():
        del state[key]
    if "tok_embeddings.weight" in state:
        args.embedding_split = embedding_split_of(state["tok_embeddings.weight"].shape, args.dim)
    return state


# The shortest max_seq_len worth suggesting when the KV cache does not fit.
SHORT_SEQ_LEN = 64


def check_cache_fits(model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError, before allocating, if the KV cache would not fit in the device's free memory;
    the message says which max_batch_size or max_seq_len would."""
    args = model.params
    attention = model.layers[0].attention

    def cache_bytes(max_batch_size: int, max_seq_len: int) -> int:  # every layer's cache on this rank
        per_layer = KVCache.bytes_for(max_batch_size, max_seq_len, attention.n_local_kv_heads, attention.head_dim,
                                      dtype)  # fmt: skip
        return args.n_layers * per_layer

    needed = cache_bytes(args.max_batch_size, args.max_seq_len)
    free = available_memory(device)
    if needed <= free:
        return
    positions = free // cache_bytes(1, 1)  # (batch row, position) pairs that fit
    if positions < SHORT_SEQ_LEN:
        advice = (f"not even max_batch_size=1 at max_seq_len={SHORT_SEQ_LEN} fits: free memory on {device} "
                  "or load the model in a smaller dtype")  # fmt: skip
    else:
        options = []
        if positions // args.max_batch_size >= 1:
            options.append(f"max_seq_len={positions // args.max_batch_size} at this batch size")
        if positions // args.max_seq_len >= 1:
            options.append(f"max_batch_size={positions // args.max_seq_len} at this length")
        advice = "e.g. " + (" or ".join(options) if options else f"max_batch_size=1 with max_seq_len={positions}")
    raise ValueError(
        f"the KV cache for max_batch_size={args.max_batch_size} x max_seq_len={args.max_seq_len} needs "
        f"{needed / 2**30:.2f} GiB on {device}, but only {free / 2**30:.2f} GiB is free: at most "
        f"{positions:,} positions fit; {advice}"
    )


def _abbreviate(items: Sequence[str], limit: int = 8) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"

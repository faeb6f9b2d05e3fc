"""The Llama transformer: RMSNorm, rotary embeddings, grouped-query attention
with a preallocated KV cache, and a SwiGLU feed-forward network.

Parameter names match Meta's checkpoints exactly, so a `consolidated.NN.pth`
shard loads with `load_state_dict(strict=True)`. The projections are
fairscale's model-parallel layers: with N ranks each rank holds 1/N of the
heads and of the feed-forward width, and a checkpoint of N shards runs on N
ranks.

Notation in the shape comments:
    B  batch size             T  new tokens in this forward call
    S  positions attended to (start_pos + T)
    D  model dim              V  vocabulary size
    H  local query heads      Hkv  local key/value heads     hd  head dim
"""

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from llama import kernels

logger = logging.getLogger(__name__)


@dataclass
class ModelArgs:
    """Architecture (from `params.json`) plus the runtime limits of the KV cache."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: one key/value head per query head
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context frequency scaling
    max_position_embeddings: Optional[int] = None  # positions it was trained for (converters store it); None: unknown

    max_batch_size: int = 32
    max_seq_len: int = 2048
    # How tok_embeddings is split over ranks: "vocab" (Llama 3, VocabParallelEmbedding)
    # or "dim" (Llama 2, ParallelEmbedding). Read from the shards, not from params.json.
    embedding_split: str = "vocab"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.embedding_split not in ("vocab", "dim"):
            raise ValueError(f"embedding_split must be 'vocab' or 'dim', got {self.embedding_split!r}")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Builds the arguments from a `params.json` dict; unknown keys are logged and ignored.

        A params.json without rope_theta is Llama 2's (Code Llama states its
        1e6, Llama 3 always states 500000): it gets Llama 2's 10000.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            logger.warning("params.json: ignoring unknown keys %s", unknown)
        args = {"rope_theta": 10000.0, **{k: v for k, v in params.items() if k in known}, **overrides}
        return cls(**args)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype: bf16 sums of squares lose too much.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def apply_llama31_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's rotary frequency scaling (8k -> 128k context).

    Long wavelengths (low frequencies) are slowed down 8x, short ones are kept,
    and the band in between is interpolated smoothly.
    """
    scale_factor = 8.0
    low_freq_factor = 1.0
    high_freq_factor = 4.0
    old_context_len = 8192  # Llama 3's original context length

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_rope(head_dim: int, end: int, theta: float, use_scaled: bool) -> torch.Tensor:
    """Cosines and sines of every (position, frequency) pair: (end, head_dim // 2, 2), fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if use_scaled:
        freqs = apply_llama31_scaling(freqs)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of every head, Meta's layout.

    x: (B, T, n_heads, hd); rope: (B or 1, T, hd/2, 2), cos and sin at the positions of x.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, n_heads, hd/2, 2)
    cos = rope[:, :, None, :, 0]  # (B or 1, T, 1, hd/2)
    sin = rope[:, :, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated once.

    Stored head-major, (max_batch_size, Hkv, max_seq_len, hd), which is the
    layout attention reads. Not part of the state dict.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @staticmethod
    def bytes_for(max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes that the k and v buffers of a cache of these sizes take, without allocating them."""
        return 2 * max_batch_size * n_kv_heads * max_seq_len * head_dim * dtype.itemsize

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Writes k, v (B, Hkv, T, hd) at `positions` and returns the keys and values
        of the first kv_len positions: (B, Hkv, kv_len, hd) each.

        positions: (1, T) when every row writes at the same positions, else (B, T).
        """
        bsz = k.shape[0]
        # One indexed write into the whole buffer (rows (B, 1) and positions broadcast to (B, T)), which
        # torch.compile does in place; the indexed view is (B, T, Hkv, hd).
        rows = torch.arange(bsz, device=k.device)[:, None]
        self.k[rows, :, positions] = k.transpose(1, 2)
        self.v[rows, :, positions] = v.transpose(1, 2)
        return self.k[:bsz, :, :kv_len], self.v[:bsz, :, :kv_len]

    def reorder(self, rows: torch.Tensor):
        """Row i of the cache becomes a copy of row rows[i] (beam search: each beam follows its parent)."""
        n = rows.shape[0]
        self.k[:n] = self.k[rows]
        self.v[:n] = self.v[rows]

    def move(self, src: int, dst: int, length: int):
        """Row dst takes the first `length` positions of row src (continuous batching compacts its rows)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def block_pool(self, n_blocks: int, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Storage for n_blocks blocks of block_size positions (prefix caching): k, v (n, Hkv, block, hd)."""
        shape = (n_blocks, self.k.shape[1], block_size, self.k.shape[3])
        return (torch.zeros(shape, dtype=self.k.dtype, device=self.k.device),
                torch.zeros(shape, dtype=self.v.dtype, device=self.v.device))

    def save_blocks(self, row: int, first_block: int, pool: Tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor):
        """pool[slots[i]] = block first_block + i of the row (its positions (first_block + i) * block ...)."""
        n, block = slots.shape[0], pool[0].shape[2]
        start = first_block * block
        for cache, blocks in ((self.k, pool[0]), (self.v, pool[1])):
            blocks[slots] = cache[row, :, start : start + n * block].unflatten(1, (n, block)).transpose(0, 1)

    def load_blocks(self, row: int, pool: Tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor):
        """Positions 0 .. n * block of the row = the n blocks pool[slots], in order."""
        n, block = slots.shape[0], pool[0].shape[2]
        for cache, blocks in ((self.k, pool[0]), (self.v, pool[1])):
            cache[row, :, : n * block] = blocks[slots].transpose(0, 1).flatten(1, 2)  # (Hkv, n * block, hd)


class Attention(nn.Module):
    """Grouped-query attention in two steps, with the KV cache written between them by the block
    (`TransformerBlock.forward`): project (queries, keys, values), then attend (over the cache)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        if args.n_kv_heads % world_size != 0:
            raise ValueError(
                f"n_kv_heads ({args.n_kv_heads}) must be divisible by the model-parallel size ({world_size})"
            )
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = args.n_kv_heads // world_size
        self.head_dim = args.head_dim
        self.cache: Optional[KVCache] = None

        def column(out_features):
            return ColumnParallelLinear(args.dim, out_features, bias=False, gather_output=False, init_method=_keep)

        self.wq = column(args.n_heads * self.head_dim)
        self.wk = column(args.n_kv_heads * self.head_dim)
        self.wv = column(args.n_kv_heads * self.head_dim)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep
        )
        self.wqkv: Optional[nn.Module] = None  # wq, wk, wv as one matmul, after fuse_projections()

    def fuse_projections(self) -> None:
        """Replaces wq, wk, wv by one linear, wqkv, holding their weights stacked (gpt-fast's layout):
        the same three products from one pass over x. The checkpoint keeps Meta's three names; this
        runs once it is loaded."""
        self.wqkv = fused_column_linear([self.wq, self.wk, self.wv])
        self.wq = self.wk = self.wv = None

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd) of x (B, T, D), and its keys and values stacked, (2, B, Hkv, T, hd),
        rotated by `rope`. (Stacked, the keys and values are one new tensor: returned from a compiled
        region (`TransformerBlock`), a view into the fused projection's output was read at the wrong
        offset by torch 2.13's inductor.)"""
        bsz, seqlen, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:  # fused: (B, T, (H + 2 Hkv) * hd), split
            kv_width = self.n_local_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_local_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # Heads first for attention: (B, H, T, hd)
        return q.transpose(1, 2), torch.stack([k, v]).transpose(2, 3)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q kᵀ / √hd) v over the cached keys and values (B, Hkv, S, hd), then wo: (B, T, D)."""
        bsz, _, seqlen, _ = q.shape
        # Grouped-query attention: each key/value head serves H / Hkv query heads.
        # With no mask (one new token, all rows at the same position) every cached position is visible.
        if seqlen == 1:  # a decode step: CPU's fused kernel has fixed costs far above this tiny product
            out = decode_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_local_kv_heads
            )  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, H * hd)
        return self.wo(out)  # (B, T, D), summed over ranks


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v for one query position, written out: (B, H, 1, hd).

    keys, values: (B, Hkv, S, hd); query head h reads key/value head h // (H / Hkv).
    mask: None or (B or 1, 1, 1, S), True where a position may be attended to.
    """
    bsz, n_heads, _, head_dim = q.shape
    if kernels.usable(q, head_dim, max_rows=None):  # on the CPU: one C++ call that reads only the visible positions
        return kernels.decode_attention(q, keys, values, mask)
    n_kv_heads = keys.shape[1]
    grouped = q.view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)  # (B, Hkv, H/Hkv, hd)
    # Compiled on CPU, both products are written as multiply-and-sums, which inductor fuses with the
    # softmax into its own loops; otherwise they are batched matmuls.
    as_sums = torch.compiler.is_compiling() and q.device.type == "cpu"
    if as_sums:
        scores = (grouped[:, :, :, None, :] * keys[:, :, None]).sum(-1)  # (B, Hkv, H/Hkv, S)
    else:
        scores = grouped @ keys.transpose(2, 3)  # (B, Hkv, H/Hkv, S)
    scores = scores.float() / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask broadcasts as (B or 1, 1, 1, S)
    probs = torch.softmax(scores, dim=-1).type_as(values)
    if as_sums:
        out = (probs[..., None] * values[:, :, None]).sum(-2)  # (B, Hkv, H/Hkv, S, hd) summed over S
    else:
        out = probs @ values  # (B, Hkv, H/Hkv, hd)
    return out.view(bsz, n_heads, 1, head_dim)  # (B, H, 1, hd)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The SwiGLU width, by the reference rule: 2/3 of 4 * dim, times the multiplier if there
    is one, rounded up to a multiple of `multiple_of`."""
    hidden_dim = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def fused_column_linear(linears: list) -> nn.Module:
    """One column-parallel linear computing what `linears` (fairscale's, on the same input) compute,
    their outputs concatenated: its local weight is theirs stacked, so on every rank it holds that
    rank's slice of each, and its output splits into theirs. Quantized layers (a checkpoint quantized
    offline) stack their own way (`stacked`, llama/quantize/modules.py)."""
    kind = type(linears[0])
    if any(type(linear) is not kind for linear in linears):
        raise TypeError(f"only layers of one kind fuse, got {sorted({type(linear).__name__ for linear in linears})}")
    if kind is not ColumnParallelLinear:
        if not hasattr(kind, "stacked"):
            raise TypeError(f"{kind.__name__} layers do not fuse")
        return kind.stacked(linears)
    weight = torch.cat([linear.weight for linear in linears])  # (Σ local out features, in features)
    world_size = fs_init.get_model_parallel_world_size()
    # fairscale allocates an (uninitialized, untouched) CPU weight of this shape; it is replaced below.
    fused = ColumnParallelLinear(weight.shape[1], weight.shape[0] * world_size, bias=False,
                                 gather_output=False, init_method=_keep)
    fused.weight = nn.Parameter(weight, requires_grad=linears[0].weight.requires_grad)
    return fused


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)

        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w13: Optional[nn.Module] = None  # w1 and w3 as one matmul, after fuse_projections()

    def fuse_projections(self) -> None:
        """Replaces w1 and w3 by one linear, w13, holding both weights stacked (see Attention's)."""
        self.w13 = fused_column_linear([self.w1, self.w3])
        self.w1 = self.w3 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:  # fused: (B, T, 2 * hidden), split
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, positions, rope, mask, kv_len):
        # A decode step or a speculative verify pass on the CPU kernels (at most kernels.MAX_ROWS tokens):
        # the whole block in one C++ call (the same math as below), eager or compiled (an opaque call in
        # the graph). It reads the causal mask off the positions: a token sees its row's positions <= its own.
        linears = self.kernel_linears(x)
        if linears is not None:
            attn = self.attention
            return kernels.decode_block(x, self.attention_norm.weight, self.ffn_norm.weight, self.ffn_norm.eps,
                                        rope, positions, attn.cache.k, attn.cache.v, attn.n_local_heads, linears)
        q, (k, v) = self.attention_inputs(x, rope)
        keys, values = self.attention.cache.update(positions, k, v, kv_len)
        return self.attention_and_feed_forward(x, q, keys, values, mask)

    def kernel_linears(self, x: torch.Tensor) -> Optional[list]:
        """The operands of wqkv, wo, w13 and w2 for `llama.kernels.decode_block`, or None where it does not
        apply: x not for the CPU kernels (fp32 activations, so an fp32 model and cache, no autograd, at most
        MAX_ROWS tokens), projections not fused, model-parallel size > 1 (the kernel has no all-reduce for
        wo's and w2's partial sums), or a layer that is none of the kernels' kinds."""
        attn, ffn = self.attention, self.feed_forward
        if (attn.wqkv is None or ffn.w13 is None or fs_init.get_model_parallel_world_size() != 1
                or not kernels.usable(x, x.shape[-1], multiple=kernels.BLOCK)):
            return None
        linears = []
        for layer in (attn.wqkv, attn.wo, ffn.w13, ffn.w2):
            operands = getattr(layer, "kernel_operands", lambda: None)()  # fairscale's own layers: None
            if operands is None:
                return None
            linears.append(operands)
        return linears

    # Compiled (a decode step that does not take `kernels.decode_block`: on a GPU, in bf16, under
    # torchrun), these two halves of a block are traced and compiled once each and that code runs for
    # every layer: the first compilation takes seconds instead of the minutes of 30 layers. The KV cache
    # is written between them, outside the regions: a region that mutated its inputs would work on
    # copies of the cache rows and copy them back, every layer of every step. In eager mode the
    # decorators do nothing.
    @torch.compiler.nested_compile_region
    def attention_inputs(self, x, rope):
        return self.attention.project(self.attention_norm(x), rope)

    @torch.compiler.nested_compile_region
    def attention_and_feed_forward(self, x, q, keys, values, mask):
        h = x + self.attention.attend(q, keys, values, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        embedding = VocabParallelEmbedding if params.embedding_split == "vocab" else ParallelEmbedding
        self.tok_embeddings = embedding(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_keep)

        # Runtime buffers, not in the state dict. A model built under
        # `torch.device("meta")` (fast loading) calls setup_caches() once it has weights.
        self.register_buffer("rope", None, persistent=False)  # (2 * max_seq_len, hd/2, 2) cos, sin
        if torch.get_default_device().type != "meta":
            self.setup_caches(params.max_batch_size, params.max_seq_len)

    def setup_caches(self, max_batch_size: int, max_seq_len: int):
        """(Re)allocates the KV caches and the rotary table on the weights' device and dtype.

        Call it again after moving the model to another dtype: `.to(dtype)`
        would cast the fp32 rotary table too.
        """
        weight = self.norm.weight  # the model's float dtype, also when the projections are quantized
        self.params.max_batch_size, self.params.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(
                max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim, weight.dtype, weight.device
            )
        # Twice the context, as in the reference, so positions never run off the table.
        rope = precompute_rope(self.params.head_dim, 2 * max_seq_len, self.params.rope_theta, self.params.use_scaled_rope)
        self.register_buffer("rope", rope.to(weight.device), persistent=False)

    def fuse_projections(self) -> "Transformer":
        """In every layer, one matmul for wq, wk, wv and one for w1, w3 (`Attention.fuse_projections`):
        the same logits from fewer, wider matmuls. Call it once the weights are loaded, before any
        quantization; returns the model."""
        for layer in self.layers:
            layer.attention.fuse_projections()
            layer.feed_forward.fuse_projections()
        return self

    def reorder_cache(self, rows: torch.Tensor):
        """Cache row i takes the keys and values of row rows[i] (a (n,) long tensor), in every layer."""
        for layer in self.layers:
            layer.attention.cache.reorder(rows)

    def move_cache_row(self, src: int, dst: int, length: int):
        """Cache row dst takes the first `length` positions of row src, in every layer."""
        for layer in self.layers:
            layer.attention.cache.move(src, dst, length)

    def cache_block_pools(self, n_blocks: int, block_size: int) -> list:
        """Per layer, storage for n_blocks blocks of keys and values (prefix caching, `KVCache.block_pool`)."""
        return [layer.attention.cache.block_pool(n_blocks, block_size) for layer in self.layers]

    def save_cache_blocks(self, row: int, first_block: int, pools: list, slots: torch.Tensor):
        """Blocks first_block.. of cache row `row` into slots of the pools, in every layer."""
        for layer, pool in zip(self.layers, pools):
            layer.attention.cache.save_blocks(row, first_block, pool, slots)

    def load_cache_blocks(self, row: int, pools: list, slots: torch.Tensor):
        """The pools' blocks at slots into the first positions of cache row `row`, in every layer."""
        for layer, pool in zip(self.layers, pools):
            layer.attention.cache.load_blocks(row, pool, slots)

    def forward(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], kv_len: Optional[int] = None
    ) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for `tokens` (B, T); see `forward_hidden`."""
        return self.output(self.forward_hidden(tokens, start_pos, kv_len)).float()

    def forward_hidden(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor], kv_len: Optional[int] = None
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) for `tokens` (B, T), before the output projection.

        Args:
            tokens: token ids; row b holds positions start_pos[b] .. start_pos[b] + T - 1.
            start_pos: position of tokens[:, 0]; an int places every row there
                (the reference API), a (B,) tensor places each row at its own
                position (batches of different prompt lengths, one pass).
            kv_len: how many cache positions attention reads. Defaults to
                start_pos + T for an int start_pos and to max_seq_len for a
                tensor (a static shape, for torch.compile); callers that know
                the rows' furthest position pass it + 1 to read less.

        Keys and values of the new positions are written into the KV cache, and
        each token attends to its row's cached positions up to its own: call
        with start_pos=0 for a new batch, then with the next tokens.
        """
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size={self.params.max_batch_size}")
        offsets = torch.arange(seqlen, device=tokens.device)
        if isinstance(start_pos, int):
            if start_pos + seqlen > self.params.max_seq_len:
                raise ValueError(
                    f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len={self.params.max_seq_len}"
                )
            positions = (start_pos + offsets)[None, :]  # (1, T): shared by every row
            kv_len = start_pos + seqlen if kv_len is None else kv_len
        else:
            # (B, T). Right padding past the context (a row prefilled from a cached prefix, beside a
            # longer one) writes at the last slot, which the first decode step there overwrites before reading.
            positions = torch.clamp(start_pos[:, None] + offsets, max=self.params.max_seq_len - 1)
            kv_len = self.params.max_seq_len if kv_len is None else kv_len

        # Causal mask over the cache: a token at position p sees its row's positions <= p.
        # Not needed for one new token at the same position in every row, reading exactly up to it.
        mask = None
        if not (isinstance(start_pos, int) and seqlen == 1 and kv_len == start_pos + 1):
            key_pos = torch.arange(kv_len, device=tokens.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B or 1, 1, T, S)

        h = self.tok_embeddings(tokens)  # (B, T, D)
        rope = self.rope[positions]  # (B or 1, T, hd/2, 2)
        for layer in self.layers:
            h = layer(h, positions, rope, mask, kv_len)
        return self.norm(h)


def _keep(weight: torch.Tensor) -> torch.Tensor:
    """fairscale init_method that leaves the weight as allocated: checkpoints overwrite it."""
    return weight

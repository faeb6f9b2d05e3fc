"""Quantized weights, applied to a built model from outside as a module swap.

`model.py` never branches on quantization: `quantize_model` replaces each
fairscale linear and the token embedding by a module that holds quantized
tensors and runs the same model-parallel communication around its own
local matmul.

Modes:
    "int8"      weight-only, one symmetric int8 scale per output row.
                CPU: `aten._weight_int8pack_mm` on bf16 activations.
    "int4"      weight-only, asymmetric int4 in groups of `group_size` input
                columns. CPU: `aten._weight_int4pack_mm_for_cpu` on bf16 activations.
                The output projection stays int8: it is the layer most
                sensitive to 4 bits (on SmolLM2, top-1 agreement with fp32
                goes from 84% to 96%), and llama.cpp's 4-bit formats keep it
                at 6 bits for the same reason.
    "llm.int8"  LLM.int8() (Dettmers et al. 2022): int8 weights as in "int8";
                activations quantized per row to int8 too, except the input
                columns holding an outlier (|x| > 6), which are multiplied in
                fp32 against the dequantized weight columns.
Every mode stores tok_embeddings as int8 rows (only the looked-up rows are
dequantized). Other devices, or shapes a CPU kernel does not take, use a
dequantize-then-matmul fallback (which torch.compile fuses on GPUs).
tests/test_quantize.py prints each mode's top-1 agreement with fp32 and its
weight memory on the bundled model.

Scales are rounded to bf16 and the integer codes are computed against the
rounded scales, so a scale survives a cast to any floating dtype exactly and
checkpoint loaders may cast floating tensors as usual.

GPTQ (`llama.gptq`): `quantize_model(..., calibration=token_ids)` and
`python -m llama.quantize ... --mode int8 --gptq` choose the int8 codes from
the layers' inputs on a calibration text (same format, same kernel, closer
to fp32); plain "int8" rounds each weight to its nearest code.

Checkpoints: `python -m llama.quantize SRC DST --mode int8` quantizes a
Meta-format checkpoint shard by shard and records the mode in params.json;
`load_quantized_model` loads one without materializing fp32 weights (a
meta-device model, `quantize_skeleton`, then `load_state_dict(assign=True)`).
A quantized shard keeps the names of the fp32 one (`...wq.weight`, now
integer) and adds `...wq.scales` (int8) or `...wq.scales_and_zeros` (int4);
int4 weights are stored as plain nibbles and packed for the CPU kernel when
loaded. Quantize after resharding: the scales of a shard belong to it.
"""

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from fairscale.nn.model_parallel.mappings import scatter_to_model_parallel_region
from torch import nn

from llama.checkpoint import (
    IGNORED_KEYS,
    StateDict,
    _skip_fairscale_init,
    check_cache_fits,
    check_state_matches,
    find_shards,
    load_model,
    load_shard,
    read_params,
    read_shard_for,
)
from llama.distributed import setup_model_parallel
from llama.gptq import gptq_int8_rows, input_second_moments
from llama.model import ModelArgs, Transformer
from llama.parallel import all_gather_last_dim, all_reduce
from llama.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

MODES = ("int8", "int4", "llm.int8")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
LLM_INT8_THRESHOLD = 6.0  # |x| above this makes an input column an outlier (the paper's value)
# SmolLM2 (the bundled model) was distributed as Q4_1, 4 bits in groups of 32:
# groups of 32 reproduce its weights, groups of 64 cut top-1 agreement to ~68%.
DEFAULT_GROUP_SIZE = 32

# Meta names of the weights that quantize as linears (the rest: embedding, norms).
LINEAR_SUFFIXES = tuple(
    f"{name}.weight" for name in
    ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "output")
)  # fmt: skip


# ---------------------------------------------------------------------------
# Tensors: quantize, pack, dequantize. Shared by the modules and the offline
# step, so a checkpoint quantized offline equals a model quantized in memory.
# ---------------------------------------------------------------------------


def quantize_int8_rows(
    weight: torch.Tensor, moment: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: weight (N, K) ~= q (N, K) int8 * scales (N, 1).

    With `moment` (H = Σ x xᵀ (K, K) of calibration inputs) the codes are chosen
    by GPTQ (`llama.gptq`) instead of rounding each weight to its nearest code.

    Returns q and scales (N,) in bf16 (q is rounded against the bf16 scales).
    """
    w = weight.float()
    low, high = w.aminmax(dim=1)  # (N,) each; no (N, K) temporary for |w|
    scales = (torch.maximum(high, -low) / 127).clamp(min=1e-10).to(torch.bfloat16)  # (N,)
    if moment is not None:
        return gptq_int8_rows(weight, scales, moment), scales
    # One (N, K) fp32 temporary, rounded and clamped in place: quantizing at load time
    # then peaks at one fp32 copy of the largest weight on top of the checkpoint.
    q = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` consecutive input columns.

    weight (N, K) ~= (q - 8) * scale + zero, q in 0..15, one (scale, zero) per
    row and group: the convention of the tinygemm kernels.

    Returns:
        nibbles: (N, K/2) uint8, q[:, 2j] in the low and q[:, 2j+1] in the high half of byte j.
        scales_and_zeros: (K/group_size, N, 2) bf16, [..., 0] scale and [..., 1] zero,
            the layout `aten._weight_int4pack_mm_for_cpu` takes.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, g)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scales = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)  # the value of code 8
    q = (w - zeros.float()[..., None]) / scales.float()[..., None] + 8
    q = q.round().clamp(0, 15).to(torch.uint8).view(n, k)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return pack_nibbles(q), scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, two per byte (even column low)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes 0..15; the inverse of pack_nibbles."""
    return torch.stack([nibbles & 15, nibbles >> 4], dim=-1).flatten(1)


def dequantize_int4(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight (N, K) that portable int4 tensors stand for."""
    q = unpack_nibbles(nibbles).float()  # (N, K)
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    q = q.view(n, k // group_size, group_size)  # (N, G, g)
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)


def _has_aten(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A fairscale Column/RowParallelLinear (no bias) with quantized weights.

    The same model-parallel communication as fairscale's layers around a local
    matmul that subclasses define in `local_forward`:
        column-parallel: (B, T, K) -> local (B, T, N/ranks), gathered to (B, T, N) if gather_output;
        row-parallel:    (B, T, K/ranks) -> local (B, T, N), summed over ranks.
    in_features and out_features are this rank's (the local weight's) sizes.
    """

    def __init__(self, in_features: int, out_features: int, parallel: str,
                 gather_output: bool = False, input_is_parallel: bool = True):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.in_features, self.out_features = in_features, out_features
        self.parallel = parallel
        self.gather_output = gather_output
        self.input_is_parallel = input_is_parallel

    @staticmethod
    def layout_of(linear: nn.Module) -> dict:
        """The constructor arguments that reproduce `linear`'s shape and parallelism."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError("quantization supports bias-free linears only (Llama has no biases)")
        out_features, in_features = linear.weight.shape  # local shard
        if isinstance(linear, ColumnParallelLinear):
            return dict(in_features=in_features, out_features=out_features, parallel="column",
                        gather_output=linear.gather_output)
        if isinstance(linear, RowParallelLinear):
            return dict(in_features=in_features, out_features=out_features, parallel="row",
                        input_is_parallel=linear.input_is_parallel)
        raise TypeError(f"expected a fairscale Column/RowParallelLinear, got {type(linear).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel == "column":
            # Quantized models only run forward, so the collectives are plain functions
            # (llama.parallel) that torch.compile can trace, not fairscale's autograd ones.
            out = self.local_forward(x)  # (B, T, N/ranks)
            return all_gather_last_dim(out) if self.gather_output else out
        if not self.input_is_parallel:
            x = scatter_to_model_parallel_region(x)
        return all_reduce(self.local_forward(x))  # (B, T, N)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parallel={self.parallel}"


class Int8Linear(QuantizedLinear):
    """Weight-only int8: weight (N, K) int8, scales (N,) bf16; W ~= weight * scales[:, None]."""

    def __init__(self, in_features: int, out_features: int, parallel: str, device=None, **parallel_args):
        super().__init__(in_features, out_features, parallel, **parallel_args)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_float(cls, linear: nn.Module, moment: Optional[torch.Tensor] = None) -> "Int8Linear":
        """moment: H = Σ x xᵀ of calibration inputs, for GPTQ's rounding (`llama.gptq`); None rounds to nearest."""
        module = cls(**cls.layout_of(linear), device=linear.weight.device)
        module.weight, module.scales = quantize_int8_rows(linear.weight.detach(), moment)
        return module

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _has_aten("_weight_int8pack_mm"):
            # The CPU kernel streams int8 weights fast only for bf16 activations (~12x slower for fp32).
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(torch.bfloat16))
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B, T, N)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class LLMInt8Linear(Int8Linear):
    """LLM.int8(): the int8 weights of Int8Linear, with int8 activations too.

    Input columns where any row has |x| > threshold (the few outlier features of
    large models) are multiplied in fp32 against the dequantized weight columns;
    the rest of x is quantized to int8 per row, multiplied with int32
    accumulation and rescaled by both scales.
    """

    threshold = LLM_INT8_THRESHOLD

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K), M = B*T
        outliers = (x2.abs() > self.threshold).any(dim=0)  # (K,)
        regular = x2.masked_fill(outliers, 0.0)
        x_scales = regular.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 127  # (M, 1)
        x_int8 = (regular / x_scales).round().to(torch.int8)  # (M, K)
        out = int8_matmul(x_int8, self.weight).float() * x_scales * self.scales.float()  # (M, N)
        if outliers.any():
            cols = outliers.nonzero().squeeze(1)  # (n_outliers,)
            w_cols = self.weight[:, cols].float() * self.scales.float()[:, None]  # (N, n_outliers)
            out = out + x2[:, cols] @ w_cols.T
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K) int8 .T -> (M, N) int32, exactly.

    `torch._int_mm` on CUDA, where it is an int8 GEMM (it needs M > 16 and K, N
    multiples of 8). On CPU it is exact but ~40x slower than an fp32 GEMM for
    a few hundred rows, so there the products are summed in fp32 over slices
    of 1024 columns: |partial sums| <= 1024 * 127 * 127 < 2**24, which fp32
    holds exactly, and the slices add up as int32.
    """
    m, k = a.shape
    if a.device.type == "cuda" and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    out = torch.zeros(m, b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, k, 1024):
        cols = slice(start, start + 1024)
        out += (a[:, cols].float() @ b[:, cols].float().T).to(torch.int32)
    return out


class Int4Linear(QuantizedLinear):
    """Weight-only int4 in groups of `group_size` input columns.

    Buffers: weight (N, K/2) uint8, two 4-bit codes a byte; scales_and_zeros
    (K/group_size, N, 2) bf16; W[n, k] ~= (code - 8) * scale + zero.

    On CPU (and N a multiple of 16) `weight` holds the kernel's own packing,
    which depends on the CPU's vector width; `state_dict()` unpacks it to the
    portable nibbles of `pack_nibbles`, and `load_state_dict` packs them again.
    Elsewhere `weight` holds the portable nibbles and is dequantized per call.
    Move an int4 model between devices by saving and loading its state dict.
    """

    def __init__(self, in_features: int, out_features: int, parallel: str, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, **parallel_args):
        super().__init__(in_features, out_features, parallel, **parallel_args)
        if group_size not in INT4_GROUP_SIZES or in_features % group_size != 0:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES} dividing in_features "
                             f"({in_features}), got {group_size}")
        self.group_size = group_size
        self.cpu_packed = False  # True: weight is in the CPU kernel's layout, not portable nibbles
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        n_groups = in_features // group_size
        self.register_buffer(
            "scales_and_zeros", torch.empty(n_groups, out_features, 2, dtype=torch.bfloat16, device=device)
        )

    @classmethod
    def from_float(cls, linear: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Linear":
        module = cls(**cls.layout_of(linear), group_size=group_size, device=linear.weight.device)
        module.weight, module.scales_and_zeros = quantize_int4_groups(linear.weight.detach(), group_size)
        module._pack_for_cpu()
        return module

    def _pack_for_cpu(self) -> None:
        """Converts portable nibbles to the CPU kernel's layout, where that kernel runs."""
        if (self.cpu_packed or self.weight.device.type != "cpu" or self.out_features % 16 != 0
                or not _has_aten("_weight_int4pack_mm_for_cpu")):
            return
        codes = unpack_nibbles(self.weight).to(torch.int32)  # (N, K)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (N, K/2) uint8
        self.cpu_packed = True

    def portable_weight(self) -> torch.Tensor:
        """The (N, K/2) portable nibbles, whatever the in-memory layout."""
        if not self.cpu_packed:
            return self.weight
        # The kernel itself unpacks: with scale 1 and zero 0 it maps the identity
        # to (code - 8), small integers that bf16 holds exactly.
        k = self.in_features
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        eye = torch.eye(k, dtype=torch.bfloat16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit)  # (K, N)
        return pack_nibbles((codes.T + 8).to(torch.uint8))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.portable_weight(), self.scales_and_zeros, self.group_size)  # (N, K) fp32

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_packed:
            if x.device.type != "cpu":
                raise RuntimeError("this Int4Linear is packed for the CPU kernel; load its state dict on the "
                                   f"{x.device.type} device instead of moving the module")
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
            sz = self.scales_and_zeros.to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, sz)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B, T, N)
        return F.linear(x, self.dequantize().to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.portable_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.cpu_packed = False  # the state dict holds portable nibbles
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict and self.weight.device.type != "meta":
            self._pack_for_cpu()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, cpu_packed={self.cpu_packed}"


class Int8Embedding(nn.Module):
    """fairscale's VocabParallelEmbedding or ParallelEmbedding with int8 rows.

    weight (V_local, D_local) int8, scales (V_local,) in the model's dtype, which
    the output takes; only the rows looked up are dequantized.
    split "vocab": this rank holds token ids [vocab_start, vocab_end), others read 0, summed over ranks;
    split "dim": this rank holds a slice of every row, gathered over ranks.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, split: str, vocab_start: int = 0,
                 vocab_end: Optional[int] = None, dtype=torch.float32, device=None):
        super().__init__()
        self.split = split
        self.vocab_start = vocab_start
        self.vocab_end = num_embeddings if vocab_end is None else vocab_end
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    @staticmethod
    def layout_of(embedding: nn.Module) -> dict:
        num_embeddings, embedding_dim = embedding.weight.shape  # local shard
        if isinstance(embedding, VocabParallelEmbedding):
            return dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim, split="vocab",
                        vocab_start=embedding.vocab_start_index, vocab_end=embedding.vocab_end_index)
        if isinstance(embedding, ParallelEmbedding):
            return dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim, split="dim")
        raise TypeError(f"expected a fairscale (Vocab)ParallelEmbedding, got {type(embedding).__name__}")

    @classmethod
    def from_float(cls, embedding: nn.Module) -> "Int8Embedding":
        weight = embedding.weight.detach()
        module = cls(**cls.layout_of(embedding), dtype=weight.dtype, device=weight.device)
        q, scales = quantize_int8_rows(weight)
        module.weight, module.scales = q, scales.to(weight.dtype)
        return module

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids][..., None]  # (B, T, D_local)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.split == "vocab":
            outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)  # (B, T): another rank's ids
            local = (tokens - self.vocab_start).masked_fill(outside, 0)
            rows = self.lookup(local).masked_fill(outside[..., None], 0.0)
            return all_reduce(rows)  # (B, T, D)
        return all_gather_last_dim(self.lookup(tokens))  # (B, T, D)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, split={self.split}"


class BitsAndBytesLinear(QuantizedLinear):
    """LLM.int8() through bitsandbytes' `Linear8bitLt`, where it runs on the model's device.

    Only `quantize_model` uses it (its state dict is bitsandbytes'); quantized
    checkpoints always load as LLMInt8Linear.
    """

    def __init__(self, inner: nn.Module, **layout):
        super().__init__(**layout)
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(x.dtype)


def _bitsandbytes_linear(linear: nn.Module) -> Optional[nn.Module]:
    """A bitsandbytes Linear8bitLt copy of `linear`, or None if bitsandbytes is
    missing or cannot run on the weight's device (tried on one input)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    weight = linear.weight.detach()
    try:
        inner = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False,
                                    has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD)
        inner.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
        inner = inner.to(weight.device)  # quantizes on the way
        inner(torch.zeros(1, weight.shape[1], dtype=torch.float16, device=weight.device))
        return inner
    except Exception as e:  # any failure: use our own implementation
        logger.info("bitsandbytes cannot run LLM.int8() on %s (%s); using llama.quantize's", weight.device, e)
        return None


# ---------------------------------------------------------------------------
# Model transforms
# ---------------------------------------------------------------------------


def linear_mode(mode: str, name: str) -> str:
    """How the linear `name` (module name, e.g. "layers.0.attention.wq") is quantized in `mode`."""
    return "int8" if mode == "int4" and name == "output" else mode


def _check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def _targets(model: Transformer) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
    """{name: module} of the fairscale linears and embeddings that quantization replaces."""
    linears, embeddings = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            linears[name] = module
        elif isinstance(module, (VocabParallelEmbedding, ParallelEmbedding)):
            embeddings[name] = module
    if not linears:
        raise ValueError("the model has no fairscale linear left to quantize (is it quantized already?)")
    return linears, embeddings


def _check_int4_groups(linears: Dict[str, nn.Module], group_size: int) -> None:
    """Raises before anything is swapped if a linear's input width is not a multiple of group_size."""
    widths = {name: linear.weight.shape[1] for name, linear in linears.items() if linear_mode("int4", name) == "int4"}
    bad = [name for name, width in widths.items() if width % group_size != 0]
    if bad:
        valid = [g for g in INT4_GROUP_SIZES if all(width % g == 0 for width in widths.values())]
        hint = f"use group_size={valid[-1]}" if valid else "use mode='int8'"
        raise ValueError(f"int4 group_size={group_size} does not divide the {widths[bad[0]]} input features "
                         f"of {bad[0]} ({len(bad)} layer(s) in all); {hint}")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def quantize_model(
    model: Transformer, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE, calibration: Optional[torch.Tensor] = None
) -> Transformer:
    """Quantizes a loaded model's weights in place; returns the model.

    Args:
        mode: "int8", "int4" or "llm.int8" (see the module docstring).
        group_size: int4 only: input columns per (scale, zero); 32, 64, 128 or 256,
            dividing every linear's (local) input width.
        calibration: int8 only: token ids (B, T) of a representative text; the
            int8 codes are then chosen by GPTQ (`llama.gptq`) from the layers'
            inputs on it, which keeps the outputs closer to fp32's.

    Raises:
        ValueError: unknown mode, an int4 group size that a layer's width does
            not allow (names the layer and a group size that works), or
            calibration with a mode other than int8.
    """
    _check_mode(mode, group_size)
    linears, embeddings = _targets(model)
    if mode == "int4":
        _check_int4_groups(linears, group_size)
    moments = {}
    if calibration is not None:
        if mode != "int8":
            raise ValueError(f"calibration (GPTQ) is implemented for mode 'int8' only, not {mode!r}")
        moments = input_second_moments(model, calibration)
    use_bnb = mode == "llm.int8" and _bitsandbytes_linear(next(iter(linears.values()))) is not None
    for name, linear in linears.items():
        kind = linear_mode(mode, name)
        if kind == "int8":
            new = Int8Linear.from_float(linear, moments.get(name))
        elif kind == "int4":
            new = Int4Linear.from_float(linear, group_size)
        elif use_bnb:
            new = BitsAndBytesLinear(_bitsandbytes_linear(linear), **QuantizedLinear.layout_of(linear))
        else:
            new = LLMInt8Linear.from_float(linear)
        _swap(model, name, new)
    for name, embedding in embeddings.items():
        _swap(model, name, Int8Embedding.from_float(embedding))
    return model


def quantize_skeleton(model: Transformer, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE) -> Transformer:
    """Swaps in empty quantized modules (on the model's device, typically meta), in place.

    Then `model.load_state_dict(quantized_state, strict=True, assign=True)`
    fills them from a checkpoint written by `quantize_checkpoint` with the same
    mode and group size, without any fp32 weight being allocated.
    """
    _check_mode(mode, group_size)
    linears, embeddings = _targets(model)
    if mode == "int4":
        _check_int4_groups(linears, group_size)
    for name, linear in linears.items():
        layout = {**QuantizedLinear.layout_of(linear), "device": linear.weight.device}
        kind = linear_mode(mode, name)
        if kind == "int4":
            new = Int4Linear(**layout, group_size=group_size)
        else:
            new = (Int8Linear if kind == "int8" else LLMInt8Linear)(**layout)
        _swap(model, name, new)
    for name, embedding in embeddings.items():
        layout = Int8Embedding.layout_of(embedding)
        _swap(model, name, Int8Embedding(**layout, dtype=embedding.weight.dtype, device=embedding.weight.device))
    return model


def load_quantized_model(shard_path: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                         quantization: dict) -> Transformer:
    """`checkpoint.load_model` for a shard written by `quantize_checkpoint`.

    Builds the model on the meta device, swaps in quantized modules and assigns
    the shard's tensors to them: no fp32 weight is ever allocated. Floating
    tensors are cast to `dtype` (norms, embedding scales), except the linears'
    scales, which stay in the bf16 that the CPU kernels take.

    Raises:
        ValueError: the shard's keys or shapes do not match the quantized model.
    """
    state = read_shard_for(shard_path, args)
    with torch.device("meta"), _skip_fairscale_init():
        model = Transformer(args)
    quantize_skeleton(model, quantization["mode"], group_size=quantization["group_size"])

    check_state_matches(model, state, f"{quantization['mode']} checkpoint {shard_path}")
    kernel_dtype = {  # the linears' floating buffers: scales, scales_and_zeros
        f"{module_name}.{name}" for module_name, module in model.named_modules()
        if isinstance(module, QuantizedLinear) for name, _ in module.named_buffers(recurse=False)
    }  # fmt: skip
    state = {name: t.to(device, dtype) if t.is_floating_point() and name not in kernel_dtype else t.to(device)
             for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    check_cache_fits(model, device, dtype)
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    return model


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def read_quantization(params: dict) -> Optional[dict]:
    """{"mode", "group_size"} from a params.json dict, or None for an unquantized checkpoint."""
    quantization = params.get("quantization")
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("mode") not in MODES:
        raise ValueError(f"params.json: 'quantization' must be {{'mode': one of {MODES}, 'group_size': int}}, "
                         f"got {quantization!r}")
    result = {"mode": quantization["mode"], "group_size": int(quantization.get("group_size", DEFAULT_GROUP_SIZE))}
    _check_mode(result["mode"], result["group_size"])
    return result


@torch.no_grad()
def quantize_state_dict(
    state: StateDict, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
    moments: Optional[Dict[str, torch.Tensor]] = None,
) -> StateDict:
    """One shard's tensors quantized as `quantize_model` quantizes the model that loads it.

    moments: int8 only: {module name: H} from `llama.gptq.input_second_moments`, for GPTQ's rounding.
    """
    _check_mode(mode, group_size)
    moments = moments or {}
    out = {}
    for name, tensor in state.items():
        if name in IGNORED_KEYS:
            continue
        prefix = name[: -len("weight")]
        if name == "tok_embeddings.weight":
            out[name], scales = quantize_int8_rows(tensor)
            out[prefix + "scales"] = scales.to(tensor.dtype)
        elif name.endswith(LINEAR_SUFFIXES) and linear_mode(mode, prefix[:-1]) == "int4":
            if tensor.shape[1] % group_size != 0:
                valid = [g for g in INT4_GROUP_SIZES if tensor.shape[1] % g == 0]
                raise ValueError(f"int4 group_size={group_size} does not divide the {tensor.shape[1]} input "
                                 f"features of {name}; " + (f"use group_size={valid[-1]}" if valid else "use int8"))
            out[name], out[prefix + "scales_and_zeros"] = quantize_int4_groups(tensor, group_size)
        elif name.endswith(LINEAR_SUFFIXES):
            out[name], out[prefix + "scales"] = quantize_int8_rows(tensor, moments.get(prefix[:-1]))
        else:
            out[name] = tensor.clone()  # norms: own storage, not a view of the source mapping
    return out


@contextlib.contextmanager
def _directory_when_complete(dst: Path) -> Iterator[Path]:
    """A temporary sibling of dst to fill, renamed to dst at the end, removed on failure."""
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


def quantize_checkpoint(
    src_dir: Union[str, Path], dst_dir: Union[str, Path], mode: str, group_size: int = DEFAULT_GROUP_SIZE,
    calibration_text: Optional[str] = None,
) -> None:
    """Writes a quantized copy of a Meta-format checkpoint, one shard at a time.

    params.json gains {"quantization": {"mode": ..., "group_size": ...}}, which
    `read_quantization` reads back; every other file (tokenizer) is copied.
    With `calibration_text` (int8, one shard) the codes are chosen by GPTQ from
    the layers' inputs on that text, read with the checkpoint's tokenizer.model.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    shards = find_shards(src)
    params = read_params(src)
    _check_mode(mode, group_size)
    if read_quantization(params) is not None:
        raise ValueError(f"{src} is quantized already ({params['quantization']}); quantize the original checkpoint")
    moments = None
    if calibration_text is not None:
        moments = _calibration_moments(src, shards, params, mode, calibration_text)
    with _directory_when_complete(dst) as tmp:
        for shard in shards:
            torch.save(quantize_state_dict(load_shard(shard), mode, group_size, moments), tmp / shard.name)
        params = {**params, "quantization": {"mode": mode, "group_size": group_size}}
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        for path in src.iterdir():
            if path.is_file() and path.suffix != ".pth" and path.name != "params.json":
                shutil.copy2(path, tmp / path.name)


def default_calibration_text() -> str:
    """A few thousand tokens of varied text (prose, dialogue, code, lists) shipped with the library."""
    return (Path(__file__).parent / "data" / "calibration.txt").read_text(encoding="utf-8")


def _calibration_moments(src: Path, shards: List[Path], params: dict, mode: str, text: str,
                         max_tokens: int = 1024) -> Dict[str, torch.Tensor]:
    """H of every linear's inputs when the fp32 model reads `text` (its first max_tokens tokens)."""
    if mode != "int8":
        raise ValueError(f"calibration (GPTQ) is implemented for mode 'int8' only, not {mode!r}")
    if len(shards) != 1:
        raise ValueError(f"{src} has {len(shards)} shards; GPTQ calibration runs the whole model in one process: "
                         "reshard it to 1 shard first (python -m llama.convert --reshard SRC DST --model-parallel 1)")
    tokenizer_path = src / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"GPTQ calibration reads its text with the checkpoint's tokenizer: {tokenizer_path} "
                                "does not exist")
    ids = load_tokenizer(tokenizer_path).encode(text, bos=True, eos=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the calibration text is empty; give a few hundred words of representative text")
    setup_model_parallel(1, torch.device("cpu"))
    args = ModelArgs.from_params({**params, "max_seq_len": len(ids), "max_batch_size": 1})
    model = load_model(shards[0], args, torch.device("cpu"), torch.float32)
    logger.info("GPTQ: calibrating on %d tokens", len(ids))
    return input_second_moments(model, torch.tensor([ids]))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llama.quantize", description="Quantize a Meta-format checkpoint directory."
    )
    parser.add_argument("src", type=Path, help="checkpoint directory (params.json, consolidated.NN.pth)")
    parser.add_argument("dst", type=Path, help="new directory for the quantized checkpoint")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"int4: input columns per (scale, zero), one of {INT4_GROUP_SIZES} "
                        f"(default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--gptq", action="store_true",
                        help="int8: choose the codes with GPTQ, calibrated on a text shipped with the library "
                        "(slower: ~1 minute for 135M parameters on 2 cores; closer to fp32)")
    parser.add_argument("--calibration-text", type=Path, default=None,
                        help="with --gptq: a UTF-8 text file to calibrate on instead (its first 1024 tokens)")
    args = parser.parse_args(argv)
    if args.calibration_text is not None and not args.gptq:
        parser.error("--calibration-text goes with --gptq")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    calibration = None
    if args.gptq:
        calibration = (args.calibration_text.read_text(encoding="utf-8") if args.calibration_text
                       else default_calibration_text())
    quantize_checkpoint(args.src, args.dst, args.mode, args.group_size, calibration)
    logger.info("wrote %s (%s)", args.dst, args.mode)


if __name__ == "__main__":
    main()

"""Modules holding quantized weights, in place of fairscale's linears and embeddings.

Each runs the same model-parallel communication as the layer it replaces
around its own local matmul or lookup.
"""

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import scatter_to_model_parallel_region
from torch import nn

from llama import kernels
from llama.parallel import COLUMN_PARALLEL, DIM_PARALLEL, ROW_PARALLEL, VOCAB_PARALLEL, all_gather_last_dim, all_reduce
from llama.quantize.kernels import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    INT8_GROUP_SIZE,
    dequantize_int4,
    int4pack_mm_cpu,
    int8_matmul,
    pack_nibbles,
    quantize_int4_groups,
    quantize_int8_groups,
    quantize_int8_rows,
    unpack_nibbles,
)

logger = logging.getLogger(__name__)

LLM_INT8_THRESHOLD = 6.0  # |x| above this makes an input column an outlier (the paper's value)


def _has_aten(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


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
        if isinstance(linear, COLUMN_PARALLEL):
            return dict(in_features=in_features, out_features=out_features, parallel="column",
                        gather_output=linear.gather_output)
        if isinstance(linear, ROW_PARALLEL):
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

    def kernel_operands(self) -> Optional[tuple]:
        """(weight, scales, group size) as `llama.kernels.decode_block` takes this layer, or None: not there."""
        return None

    @staticmethod
    def check_stackable(linears: list) -> None:
        """Raises unless `linears` are column-parallel layers of one input whose local outputs concatenate."""
        first = linears[0]
        if any(linear.parallel != "column" or linear.gather_output or linear.in_features != first.in_features
               or getattr(linear, "group_size", None) != getattr(first, "group_size", None) for linear in linears):
            raise ValueError("only column-parallel layers of one input width and group size, outputs not "
                             "gathered, stack into one")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parallel={self.parallel}"


class Int8Linear(QuantizedLinear):
    """Weight-only int8: weight (N, K) int8 and bf16 scales, one per row, (N,) (group_size None), or one
    per row and group of `group_size` input columns, (N, K/group_size): W ~= weight * its scale."""

    def __init__(self, in_features: int, out_features: int, parallel: str, device=None,
                 group_size: Optional[int] = None, **parallel_args):
        super().__init__(in_features, out_features, parallel, **parallel_args)
        if group_size is not None and in_features % group_size != 0:
            raise ValueError(f"int8 group_size={group_size} does not divide in_features={in_features}")
        self.group_size = group_size
        scales_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(scales_shape, dtype=torch.bfloat16, device=device))

    @staticmethod
    def group_size_for(in_features: int, group_size: Optional[int] = INT8_GROUP_SIZE) -> Optional[int]:
        """The group size a layer of this width takes: one scale per row where group_size does not divide it."""
        return group_size if group_size is not None and in_features % group_size == 0 else None

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: Optional[int],
                 moment: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of `weight` as this layer holds them for `group_size` (None: a scale per row)."""
        if group_size is None:
            return quantize_int8_rows(weight, moment)
        return quantize_int8_groups(weight, group_size, moment)

    @classmethod
    def from_float(cls, linear: nn.Module, moment: Optional[torch.Tensor] = None,
                   group_size: Optional[int] = INT8_GROUP_SIZE) -> "Int8Linear":
        """A scale per row and group of `group_size` input columns (None, or a group size that does
        not divide the width: per row). moment: H = Σ x xᵀ of calibration inputs, for GPTQ's rounding
        (`gptq.py`); None rounds to nearest."""
        weight = linear.weight.detach()
        group_size = cls.group_size_for(weight.shape[1], group_size)
        module = cls(**cls.layout_of(linear), device=weight.device, group_size=group_size)
        module.weight, module.scales = cls.quantize(weight, group_size, moment)
        return module

    @classmethod
    def stacked(cls, linears: list) -> "Int8Linear":
        """One layer computing what the column-parallel `linears` compute, outputs concatenated: their weights
        and scales stacked (`llama.model.fused_column_linear`; a row's scales belong to its row)."""
        cls.check_stackable(linears)
        first = linears[0]
        module = cls(first.in_features, sum(linear.out_features for linear in linears), "column",
                     device=first.weight.device, group_size=first.group_size)
        module.weight = torch.cat([linear.weight for linear in linears])  # (Σ N, K)
        module.scales = torch.cat([linear.scales for linear in linears])  # (Σ N,) or (Σ N, K/group_size)
        return module

    def dequantize(self) -> torch.Tensor:
        if self.group_size is None:
            return self.weight.float() * self.scales.float()[:, None]  # (N, K)
        n, k = self.weight.shape
        groups = self.weight.float().view(n, k // self.group_size, self.group_size)  # (N, G, g)
        return (groups * self.scales.float()[..., None]).view(n, k)

    def kernel_operands(self) -> Optional[tuple]:
        columns = self.group_size or self.in_features  # per scale; the kernel takes multiples of its blocks
        return (self.weight, self.scales, columns) if columns % kernels.BLOCK == 0 else None

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = self.group_size or self.in_features
        if columns % kernels.BLOCK == 0 and kernels.usable(x, self.in_features, multiple=kernels.BLOCK):
            return kernels.linear_int8(x, self.weight, self.scales, columns)
        if self.group_size is not None:
            return F.linear(x, self.dequantize().to(x.dtype))  # prefills (many rows): one GEMM
        if x.device.type == "cpu" and _has_aten("_weight_int8pack_mm"):
            # The CPU kernel streams int8 weights fast only for bf16 activations (~12x slower for fp32).
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(torch.bfloat16))
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B, T, N)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class LLMInt8Linear(Int8Linear):
    """LLM.int8(): the int8 weights of Int8Linear, with int8 activations too.

    Input columns where any row has |x| > threshold (the few outlier features of
    large models) are multiplied in fp32 against the dequantized weight columns;
    the rest of x is quantized to int8 per row, multiplied with int32
    accumulation and rescaled by both scales.
    """

    threshold = LLM_INT8_THRESHOLD

    @classmethod
    def from_float(cls, linear: nn.Module) -> "LLMInt8Linear":
        return super().from_float(linear, group_size=None)  # its product rescales whole rows

    def kernel_operands(self) -> Optional[tuple]:
        return None  # its own product (outlier columns in fp32), not the kernels' int8 one

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


class Int4Linear(QuantizedLinear):
    """Weight-only int4 in groups of `group_size` input columns.

    Buffers: weight (N, K/2) uint8, two 4-bit codes a byte; scales_and_zeros
    (K/group_size, N, 2) bf16; W[n, k] ~= (code - 8) * scale + zero.

    On CPU `weight` holds a kernel's own packing (`packing`): "blocks" for `llama.kernels`
    (scales_and_zeros then in its layout too, `pack_int4_scales`), else "tinygemm" for
    `aten._weight_int4pack_mm_for_cpu` (N a multiple of 16), whose layout depends on the CPU's
    vector width. `state_dict()` unpacks either to the portable nibbles of `pack_nibbles`, and
    `load_state_dict` packs them again. Elsewhere `weight` holds the portable nibbles and is
    dequantized per call. Move an int4 model between devices by saving and loading its state dict.
    """

    def __init__(self, in_features: int, out_features: int, parallel: str, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, **parallel_args):
        super().__init__(in_features, out_features, parallel, **parallel_args)
        if group_size not in INT4_GROUP_SIZES or in_features % group_size != 0:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES} dividing in_features "
                             f"({in_features}), got {group_size}")
        self.group_size = group_size
        self.packing: Optional[str] = None  # None: portable nibbles; "blocks" or "tinygemm": a CPU kernel's
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

    @classmethod
    def stacked(cls, linears: list) -> "Int4Linear":
        """One layer computing what the column-parallel `linears` compute, outputs concatenated: their
        portable codes and scales stacked, then packed for the CPU kernel where one runs."""
        cls.check_stackable(linears)
        first = linears[0]
        module = cls(first.in_features, sum(linear.out_features for linear in linears), "column",
                     group_size=first.group_size, device=first.weight.device)
        module.weight = torch.cat([linear.portable_weight() for linear in linears])  # (Σ N, K/2)
        module.scales_and_zeros = torch.cat([linear.portable_scales_and_zeros() for linear in linears],
                                            dim=1)  # (K/group_size, Σ N, 2)
        module._pack_for_cpu()
        return module

    def _pack_for_cpu(self) -> None:
        """Converts portable nibbles to a CPU kernel's layout, where one runs."""
        if self.packing is not None or self.weight.device.type != "cpu":
            return
        codes = unpack_nibbles(self.weight)  # (N, K)
        if kernels.load():
            self.weight = kernels.pack_int4_blocks(codes)
            self.scales_and_zeros = kernels.pack_int4_scales(self.scales_and_zeros)
            self.packing = "blocks"
        elif self.out_features % 16 == 0 and _has_aten("_weight_int4pack_mm_for_cpu"):
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            self.packing = "tinygemm"

    def portable_weight(self) -> torch.Tensor:
        """The (N, K/2) portable nibbles, whatever the in-memory layout."""
        if self.packing is None:
            return self.weight
        if self.packing == "blocks":
            return pack_nibbles(kernels.unpack_int4_blocks(self.weight))
        # The tinygemm kernel itself unpacks: with scale 1 and zero 0 it maps the identity
        # to (code - 8), small integers that bf16 holds exactly.
        k = self.in_features
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        eye = torch.eye(k, dtype=torch.bfloat16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit)  # (K, N)
        return pack_nibbles((codes.T + 8).to(torch.uint8))

    def portable_scales_and_zeros(self) -> torch.Tensor:
        """(K/group_size, N, 2) bf16, whatever the in-memory layout."""
        if self.packing == "blocks":
            return kernels.unpack_int4_scales(self.scales_and_zeros, self.out_features)
        return self.scales_and_zeros

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight."""
        if self.packing == "blocks":  # straight from the kernel layout, vectorized: prefills run this per pass
            return kernels.dequantize_int4(self.weight, self.scales_and_zeros, self.group_size)
        return dequantize_int4(self.portable_weight(), self.portable_scales_and_zeros(), self.group_size)

    def kernel_operands(self) -> Optional[tuple]:
        return (self.weight, self.scales_and_zeros, self.group_size) if self.packing == "blocks" else None

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing is not None and x.device.type != "cpu":
            raise RuntimeError("this Int4Linear is packed for a CPU kernel; load its state dict on the "
                               f"{x.device.type} device instead of moving the module")
        if self.packing == "blocks" and kernels.usable(x, self.in_features, multiple=kernels.BLOCK):
            return kernels.linear_int4(x, self.weight, self.scales_and_zeros, self.group_size)
        if self.packing == "tinygemm":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
            sz = self.scales_and_zeros.to(torch.bfloat16)
            out = int4pack_mm_cpu(x2, self.weight, self.group_size, sz)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B, T, N)
        return F.linear(x, self.dequantize().to(x.dtype))  # prefills (many rows): one GEMM

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.portable_weight()
        destination[prefix + "scales_and_zeros"] = self.portable_scales_and_zeros()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.packing = None  # the state dict holds portable nibbles
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict and self.weight.device.type != "meta":
            self._pack_for_cpu()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, packing={self.packing}"


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
        if isinstance(embedding, VOCAB_PARALLEL):
            return dict(num_embeddings=num_embeddings, embedding_dim=embedding_dim, split="vocab",
                        vocab_start=embedding.vocab_start_index, vocab_end=embedding.vocab_end_index)
        if isinstance(embedding, DIM_PARALLEL):
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


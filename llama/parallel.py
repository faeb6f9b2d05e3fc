"""Compile-friendly twins of fairscale's model-parallel layers.

fairscale's layers pass activations through autograd Functions that mark
their input dirty (`ctx.mark_dirty`), which `torch.compile` cannot trace. The
twins below hold the very same parameters and compute the same thing, with
the collectives written as functional collectives that the compiler can
place in its graph. `make_compilable(model)` swaps them in from outside the
model, as quantization does.

On one rank every collective is skipped, as fairscale does.

The engine (`llama.engine.model_runner`) runs the twins, compiled or not. Their matmul
is `linear`: for the few rows of activations of a decode step on the CPU it is
`llama.kernels.linear_f32`, which streams the weight at about the memory's bandwidth where
MKL's fp32 matrix-vector product reaches half of it (`python -m bench.linear_kernels`).
"""

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from llama import kernels


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the model-parallel ranks."""
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    return funcol.all_reduce(x, "sum", fs_init.get_model_parallel_group())


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along the last dimension, in rank order."""
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    return funcol.all_gather_tensor(x, x.dim() - 1, fs_init.get_model_parallel_group())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ: (..., K) x (N, K) -> (..., N); a decode step's few rows on the CPU stream W with `llama.kernels`."""
    if kernels.usable(x, weight.shape[1]) and weight.dtype == torch.float32:
        return kernels.linear_f32(x, weight)
    return F.linear(x, weight)


class ColumnParallel(nn.Module):
    """y = x W_localᵀ: this rank's slice of the output features (all of them if gather_output)."""

    def __init__(self, layer: ColumnParallelLinear):
        super().__init__()
        self.weight = layer.weight  # (out_features / ranks, in_features)
        self.gather_output = layer.gather_output

    def kernel_operands(self):
        """(weight, None, 0), the operands `llama.kernels.decode_block` multiplies with; None unless fp32."""
        return (self.weight, None, 0) if self.weight.dtype == torch.float32 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return all_gather_last_dim(y) if self.gather_output else y


class RowParallel(nn.Module):
    """y = Σ_ranks x_local W_localᵀ, from this rank's slice of the input features."""

    def __init__(self, layer: RowParallelLinear):
        super().__init__()
        self.weight = layer.weight  # (out_features, in_features / ranks)
        if not layer.input_is_parallel:
            raise ValueError("the twin of RowParallelLinear takes inputs already split (input_is_parallel=True)")
        self.input_is_parallel = True

    kernel_operands = ColumnParallel.kernel_operands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.weight))


class VocabParallel(nn.Module):
    """Embedding split along the vocabulary: each rank looks up the ids it holds, zeros elsewhere, summed."""

    def __init__(self, layer: VocabParallelEmbedding):
        super().__init__()
        self.weight = layer.weight  # (vocab_size / ranks, dim)
        self.vocab_start_index, self.vocab_end_index = layer.vocab_start_index, layer.vocab_end_index

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if fs_init.get_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start_index) | (tokens >= self.vocab_end_index)
        local = torch.where(outside, 0, tokens - self.vocab_start_index)
        rows = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return all_reduce(rows)


class DimParallel(nn.Module):
    """Embedding split along the model dimension: each rank looks up its columns, gathered."""

    def __init__(self, layer: ParallelEmbedding):
        super().__init__()
        self.weight = layer.weight  # (vocab_size, dim / ranks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))


_TWINS = {
    ColumnParallelLinear: ColumnParallel,
    RowParallelLinear: RowParallel,
    VocabParallelEmbedding: VocabParallel,
    ParallelEmbedding: DimParallel,
}


# Each fairscale layer or its twin (what quantization replaces, whichever the model holds).
COLUMN_PARALLEL = (ColumnParallelLinear, ColumnParallel)
ROW_PARALLEL = (RowParallelLinear, RowParallel)
VOCAB_PARALLEL = (VocabParallelEmbedding, VocabParallel)
DIM_PARALLEL = (ParallelEmbedding, DimParallel)


def make_compilable(model: nn.Module) -> nn.Module:
    """Replaces, in place, every fairscale layer of `model` by its twin sharing the same weight."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            twin = _TWINS.get(type(child))
            if twin is not None:
                setattr(parent, name, twin(child))
    return model

"""Quantized tensors: quantize, pack, dequantize, multiply.

Shared by the modules (`llama.quantize.modules`) and the offline step
(`llama.quantize.checkpoint`), so a checkpoint quantized offline equals a
model quantized in memory.
"""

from typing import Optional, Tuple

import torch

from llama.quantize.gptq import gptq_int8_rows

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
# SmolLM2 (the bundled model) was distributed as Q4_1, 4 bits in groups of 32:
# groups of 32 reproduce its weights, groups of 64 cut top-1 agreement to ~68%.
DEFAULT_GROUP_SIZE = 32
# Mode "int8": a scale per row and group of 32 input columns (llama.cpp's Q8_0). One scale per row cost
# SmolLM2 top-1 agreement with fp32 (93.8% against 97.7%, 256 positions): its weights came from Q4_1,
# whose groups of 32 have ranges far apart, and a row's single step is too coarse for the narrow ones.
INT8_GROUP_SIZE = 32


def quantize_int8_groups(
    weight: torch.Tensor, group_size: int, moment: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row and group of `group_size` consecutive input columns:
    weight (N, K) ~= q (N, K) int8 * scales (N, K/group_size), each scale over its group's columns.

    With `moment` (H = Σ x xᵀ (K, K) of calibration inputs) the codes are chosen
    by GPTQ (`llama.quantize.gptq`) instead of rounding each weight to its nearest code.

    Returns q and scales (N, K/group_size) in bf16 (q is rounded against the bf16 scales).
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, g)
    low, high = w.aminmax(dim=-1)  # (N, G) each; no (N, K) temporary for |w|
    scales = (torch.maximum(high, -low) / 127).clamp(min=1e-10).to(torch.bfloat16)  # (N, G)
    if moment is not None:
        return gptq_int8_rows(weight, scales, moment), scales
    # One (N, K) fp32 temporary, rounded and clamped in place: quantizing at load time
    # then peaks at one fp32 copy of the largest weight on top of the checkpoint.
    q = (w / scales.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)  # (N, G, g)
    return q.view(n, k), scales


def quantize_int8_rows(
    weight: torch.Tensor, moment: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: `quantize_int8_groups` with one group a row; scales (N,)."""
    q, scales = quantize_int8_groups(weight, weight.shape[1], moment)
    return q, scales.view(-1)


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


@torch.library.custom_op("llama::int4pack_mm_cpu", mutates_args=())
def int4pack_mm_cpu(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                    scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int4pack_mm_for_cpu` (x (M, K) bf16, CPU-packed int4 weight -> (M, N) bf16) as an
    opaque op: torch.compile calls it as it is. Inductor's own lowering of the aten op fails inside
    the decode step's nested compile region ("group size must be a scalar", torch 2.13)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


@int4pack_mm_cpu.register_fake
def _(x, weight, group_size, scales_and_zeros):
    return x.new_empty(x.shape[0], weight.shape[0])

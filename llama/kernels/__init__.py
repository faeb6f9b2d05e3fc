"""Matrix products and attention for CPU decoding, hand-written in C++ (`decode.cpp`) and built on first use.

A decode step multiplies a few rows of activations (one per sequence, or the k + 1 positions of
a speculative verify pass) with every weight of the model, so its speed is how fast the weights
stream from memory. MKL's fp32 matrix-vector and small matrix products reach a third to half of
the memory's bandwidth on these CPUs, and ATen's int8/int4 weight-only kernels are compute-bound
for fp32 activations. `decode.cpp` streams each weight once per call at up to 16 rows of
activations, fp32, int8 (a scale per row and group of columns) or int4 (a scale and zero per group
of columns):

    linear_f32(x, w)                      x (..., K) fp32 @ w (N, K)ᵀ          -> (..., N) fp32
    linear_int8(x, q, scales, group_size) w = q (N, K) int8 * scales bf16 (N, K/group_size), a scale per
                                          row and group of columns (group_size K: one per row)
    linear_int4(x, q, sz, group_size)     w = (q - 8) * scale + zero, q (N, K/2) in `pack_int4_blocks`
                                          layout, sz bf16 [scale, zero] in `pack_int4_scales` layout

and the attention of one new position per row over the KV cache, which reads only each row's
visible positions (a compiled step passes the whole cache with a mask; PyTorch would read it all):

    decode_attention(q, keys, values, mask)  q (B, H, 1, hd), keys/values (B, Hkv, S, hd) -> (B, H, 1, hd)

and a whole transformer block for a few new positions per row (decode steps, speculative verify
passes), `decode_block`: what `llama.model.TransformerBlock` computes, its KV cache written and read,
in one call (at model-parallel size 1, where a batch-1 step spent as long dispatching the block's
twenty-odd PyTorch operations as multiplying its weights).

int8 weights meet the activations quantized to int16 and int4 weights to int8, in blocks of 32
columns (integer dot products). `usable(x)` says whether a call with these activations should take them: x86-64 with AVX2 and
FMA, a C++ compiler to build the extension (once per machine and torch version, cached under
LLAMA_KERNELS_CACHE, default ~/.cache/llama/kernels), fp32 activations on the CPU, at most
MAX_ROWS rows and no autograd. Elsewhere the callers use PyTorch's own kernels. LLAMA_KERNELS=0
turns them off (to compare against PyTorch's, say). They are opaque to torch.compile, which
calls them from its graph as they are (`register_fake` gives it their output shapes).
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.utils.cpp_extension

logger = logging.getLogger(__name__)

BLOCK = 32  # int8/int4 weights: in_features a multiple of this (activations are quantized in blocks of 32)
TILE_ROWS = 4  # weight rows a kernel reads at once (decode.cpp's ROWS)
MAX_ROWS = 16  # more rows of activations: PyTorch's matrix products (MKL's GEMM) are faster
SOURCE = Path(__file__).with_name("decode.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-fopenmp", "-DNDEBUG"]

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_KERNELS_CACHE", Path.home() / ".cache" / "llama" / "kernels"))


def _build_command(output: Path) -> list:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    includes = [f"-I{path}" for path in torch.utils.cpp_extension.include_paths()]
    libraries = [f"-L{path}" for path in torch.utils.cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [compiler, *FLAGS, abi, *includes, str(SOURCE), "-o", str(output), *libraries, "-lc10", "-ltorch_cpu"]


def _library() -> Path:
    """The built extension, compiled now if this source, torch and compiler have not built it before."""
    command = _build_command(Path("decode.so"))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *command]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"decode-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the CPU decoding kernels (%s), once per machine and torch version", library)
    # Built under a temporary name and renamed: processes building at once (torchrun's ranks) each
    # write their own file, and none loads a half-written one.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as partial:
        output = Path(partial.name)
    try:
        result = subprocess.run(_build_command(output), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")
        os.replace(output, library)
    finally:
        output.unlink(missing_ok=True)
    return library


def _supported_machine() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512") and sys.platform.startswith("linux")


def load() -> bool:
    """Builds (first time) and loads the kernels; False, with the reason logged, where they cannot run."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = False
            if os.environ.get("LLAMA_KERNELS", "1") == "0":
                logger.info("CPU kernels turned off by LLAMA_KERNELS=0")
            elif not _supported_machine():
                logger.info("CPU kernels need Linux on x86-64 with AVX2; using PyTorch's")
            else:
                try:
                    torch.ops.load_library(str(_library()))
                    _register_fakes()
                    _loaded = True
                except (OSError, RuntimeError) as error:
                    logger.warning("CPU kernels unavailable, using PyTorch's: %s", error)
        return _loaded


def _register_fakes() -> None:
    for name in ("linear_f32", "linear_int8", "linear_int4"):
        torch.library.register_fake(f"llama_kernels::{name}")(
            lambda x, weight, *args: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake("llama_kernels::decode_attention")(lambda q, keys, values, mask: torch.empty_like(q))
    torch.library.register_fake("llama_kernels::decode_block")(lambda x, *args: torch.empty_like(x))
    torch.library.register_fake("llama_kernels::dequantize_int4")(
        lambda weight, scales_and_zeros, group_size: weight.new_empty(weight.shape[0], weight.shape[1] * 2,
                                                                      dtype=torch.float32))


def usable(x: torch.Tensor, in_features: int, multiple: int = 8, max_rows: Optional[int] = MAX_ROWS) -> bool:
    """Whether a product of these activations (..., in_features) should run on the kernels
    (attention: x the queries, in_features the head size, any number of rows)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or in_features % multiple != 0:
        return False
    if (max_rows is not None and x.shape[:-1].numel() > max_rows) or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return bool(_loaded) or (_loaded is None and not torch.compiler.is_compiling() and load())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.ops.llama_kernels.linear_f32(_rows(x), weight)  # (M, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    out = torch.ops.llama_kernels.linear_int8(_rows(x), weight, scales, group_size)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    out = torch.ops.llama_kernels.linear_int4(_rows(x), weight, scales_and_zeros, group_size)
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v for one query position per row: q (B, H, 1, hd), keys and values
    (B, Hkv, S, hd), mask None or (B or 1, 1, 1, S) bool, True where a position may be attended to.
    Reads each row's positions up to its last visible one only. Returns (B, H, 1, hd)."""
    flat_mask = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1]).contiguous()
    out = torch.ops.llama_kernels.decode_attention(q.reshape(q.shape[0], q.shape[1], q.shape[3]).contiguous(),
                                                   keys, values, flat_mask)
    return out.view(q.shape)


def decode_block(x: torch.Tensor, attention_norm: torch.Tensor, ffn_norm: torch.Tensor, eps: float,
                 rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 n_heads: int, linears: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor], int]]) -> torch.Tensor:
    """A transformer block for a few new tokens per row (B * T <= MAX_ROWS): x (B, T, D) -> (B, T, D), as
    `llama.model.TransformerBlock` computes it. The keys and values of the new tokens are written into
    cache_k, cache_v (B', Hkv, S, hd) at `positions` ((1 or B, T)), and the token at position p of row b
    attends to that row's positions 0..p. rope (1 or B, T, hd/2, 2): cos and sin at the positions.
    linears: wqkv, wo, w13 (gate, then up), w2, each as (weight, scales or None, group size), what
    linear_f32 (scales None), linear_int8 (int8 weight) or linear_int4 (uint8 weight) take."""
    weights, scales, group_sizes = zip(*linears)
    return torch.ops.llama_kernels.decode_block(
        x.contiguous(), attention_norm, ffn_norm, eps, rope.contiguous(), positions.contiguous(), cache_k, cache_v,
        n_heads, list(weights), list(scales), list(group_sizes))


def dequantize_int4(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 (N, K) weight of int4 codes and scales in the kernel layout (what linear_int4 multiplies)."""
    return torch.ops.llama_kernels.dequantize_int4(weight, scales_and_zeros, group_size)


def pack_int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8 in the kernel's layout: in each block of 32 columns,
    byte j holds column j (low nibble) and column j + 16 (high)."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).view(n, k // 32, 2, 16)  # (N, blocks, half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4_blocks(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_blocks: (N, K/2) uint8 -> (N, K) codes."""
    n, half = packed.shape
    blocks = packed.view(n, half // 16, 1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(n, half * 2)


def pack_int4_scales(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """(K/group_size, N, 2) bf16 [scale, zero] -> the kernel's (ceil(N/4), K/group_size, 2, 4): for each
    tile of 4 weight rows and each group, the 4 scales then the 4 zeros (rows past N are zeros)."""
    groups, n, _ = scales_and_zeros.shape
    tiles = -(-n // TILE_ROWS)
    padded = scales_and_zeros.new_zeros(groups, tiles * TILE_ROWS, 2)
    padded[:, :n] = scales_and_zeros
    return padded.view(groups, tiles, TILE_ROWS, 2).permute(1, 0, 3, 2).contiguous()


def unpack_int4_scales(tiled: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of pack_int4_scales: (K/group_size, N, 2)."""
    tiles, groups, _, rows = tiled.shape
    return tiled.permute(1, 0, 3, 2).reshape(groups, tiles * rows, 2)[:, :out_features].contiguous()

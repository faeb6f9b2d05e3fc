"""Model transforms: quantize a loaded model, or swap empty quantized modules into a skeleton."""

from typing import Dict, Optional, Set, Tuple

import torch
from torch import nn

from llama.checkpoint import SkeletonTransform
from llama.model import Transformer
from llama.parallel import COLUMN_PARALLEL, DIM_PARALLEL, ROW_PARALLEL, VOCAB_PARALLEL
from llama.quantize.gptq import input_second_moments
from llama.quantize.kernels import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, INT8_GROUP_SIZE
from llama.quantize.modules import (
    BitsAndBytesLinear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    LLMInt8Linear,
    QuantizedLinear,
    _bitsandbytes_linear,
)

MODES = ("int8", "int4", "llm.int8")


def linear_mode(mode: str, name: str) -> str:
    """How the linear `name` (module name, e.g. "layers.0.attention.wq") is quantized in `mode`."""
    return "int8" if mode == "int4" and name == "output" else mode


def check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def _targets(model: Transformer) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
    """{name: module} of the fairscale linears and embeddings (or their twins) that quantization replaces."""
    linears, embeddings = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, COLUMN_PARALLEL + ROW_PARALLEL):
            linears[name] = module
        elif isinstance(module, VOCAB_PARALLEL + DIM_PARALLEL):
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
        mode: "int8", "int4" or "llm.int8" (see the package docstring, llama/quantize/__init__.py).
        group_size: int4 only: input columns per (scale, zero); 32, 64, 128 or 256,
            dividing every linear's (local) input width.
        calibration: int8 only: token ids (B, T) of a representative text; the
            int8 codes are then chosen by GPTQ (`llama.quantize.gptq`) from the layers'
            inputs on it, which keeps the outputs closer to fp32's.

    Raises:
        ValueError: unknown mode, an int4 group size that a layer's width does
            not allow (names the layer and a group size that works), or
            calibration with a mode other than int8.
    """
    check_mode(mode, group_size)
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


def quantize_skeleton(model: Transformer, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                      int8_group_size: Optional[int] = INT8_GROUP_SIZE) -> Transformer:
    """Swaps in empty quantized modules (on the model's device, typically meta), in place.

    Then `model.load_state_dict(quantized_state, strict=True, assign=True)`
    fills them from a checkpoint written by `quantize_checkpoint` with the same
    mode and group sizes (int8_group_size: the int8 linears' scales, None: one per row),
    without any fp32 weight being allocated.
    """
    check_mode(mode, group_size)
    linears, embeddings = _targets(model)
    if mode == "int4":
        _check_int4_groups(linears, group_size)
    for name, linear in linears.items():
        layout = {**QuantizedLinear.layout_of(linear), "device": linear.weight.device}
        kind = linear_mode(mode, name)
        if kind == "int4":
            new = Int4Linear(**layout, group_size=group_size)
        elif kind == "int8":
            new = Int8Linear(**layout, group_size=Int8Linear.group_size_for(layout["in_features"], int8_group_size))
        else:
            new = LLMInt8Linear(**layout)
        _swap(model, name, new)
    for name, embedding in embeddings.items():
        layout = Int8Embedding.layout_of(embedding)
        _swap(model, name, Int8Embedding(**layout, dtype=embedding.weight.dtype, device=embedding.weight.device))
    return model


def skeleton_transform(quantization: dict) -> SkeletonTransform:
    """What `llama.checkpoint.load_model` applies to load a shard written by `quantize_checkpoint`.

    quantization: {"mode", "group_size", "int8_group_size"}, as `read_quantization` reads it from params.json.
    The transform swaps empty quantized modules into the meta-device model
    (`quantize_skeleton`), so no fp32 weight is ever allocated, and keeps the
    linears' scales in the bf16 that the CPU kernels take (norms and embedding
    scales take the model's dtype).
    """

    def transform(model: Transformer) -> Set[str]:
        quantize_skeleton(model, quantization["mode"], group_size=quantization["group_size"],
                          int8_group_size=quantization["int8_group_size"])
        return {  # the linears' floating buffers: scales, scales_and_zeros
            f"{module_name}.{name}" for module_name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) for name, _ in module.named_buffers(recurse=False)
        }  # fmt: skip

    return transform

"""Quantized weights, applied to a built model from outside as a module swap.

`model.py` never branches on quantization: `quantize_model` replaces each
fairscale linear and the token embedding by a module that holds quantized
tensors and runs the same model-parallel communication around its own
local matmul.

Modes:
    "int8"      weight-only, symmetric int8 with a scale per output row and group
                of 32 input columns (llama.cpp's Q8_0; one scale per row cost
                SmolLM2 4 points of top-1 agreement with fp32). CPU decode steps:
                `llama.kernels.linear_int8` (activations in int16); elsewhere
                dequantize-then-matmul.
    "int4"      weight-only, asymmetric int4 in groups of `group_size` input
                columns. CPU decode steps: `llama.kernels.linear_int4` (activations
                in int8); without those kernels `aten._weight_int4pack_mm_for_cpu`.
                The output projection stays int8: it is the layer most
                sensitive to 4 bits (on SmolLM2, top-1 agreement with fp32
                goes from 84% to 96%), and llama.cpp's 4-bit formats keep it
                at 6 bits for the same reason.
    "llm.int8"  LLM.int8() (Dettmers et al. 2022): int8 weights, a scale per row;
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

GPTQ (`llama.quantize.gptq`): `quantize_model(..., calibration=token_ids)` and
`python -m llama.quantize ... --mode int8 --gptq` choose the int8 codes from
the layers' inputs on a calibration text (same format, same kernel); plain
"int8" rounds each weight to its nearest code.

Checkpoints: `python -m llama.quantize SRC DST --mode int8` quantizes a
Meta-format checkpoint shard by shard and records the mode in params.json;
`checkpoint.load_model(..., transform=skeleton_transform(quantization))`
loads one without materializing fp32 weights (a meta-device model,
`quantize_skeleton`, then `load_state_dict(assign=True)`).
A quantized shard keeps the names of the fp32 one (`...wq.weight`, now
integer) and adds `...wq.scales` (int8) or `...wq.scales_and_zeros` (int4);
int4 weights are stored as plain nibbles and packed for the CPU kernel when
loaded. Quantize after resharding: the scales of a shard belong to it.

The package, one concern a module:
    kernels.py    the tensors: quantize, pack, dequantize, int8 matmul
    modules.py    QuantizedLinear (Int8Linear, LLMInt8Linear, Int4Linear,
                  BitsAndBytesLinear) and Int8Embedding
    transform.py  quantize_model, quantize_skeleton, skeleton_transform
    gptq.py       GPTQ's rounding for int8
    checkpoint.py quantize_checkpoint and what it writes
    cli.py        python -m llama.quantize
"""

# The public names: `from llama.quantize import X` and `llama.quantize.X`.
# fmt: off
from llama.quantize.checkpoint import (LINEAR_SUFFIXES, default_calibration_text, quantize_checkpoint,
                                       quantize_state_dict, read_quantization)
from llama.quantize.cli import main
from llama.quantize.gptq import gptq_int8_rows, input_second_moments
from llama.quantize.kernels import (DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, INT8_GROUP_SIZE, dequantize_int4,
                                    int8_matmul, pack_nibbles, quantize_int4_groups, quantize_int8_groups,
                                    quantize_int8_rows, unpack_nibbles)
from llama.quantize.modules import (LLM_INT8_THRESHOLD, BitsAndBytesLinear, Int4Linear, Int8Embedding, Int8Linear,
                                    LLMInt8Linear, QuantizedLinear)
from llama.quantize.transform import MODES, linear_mode, quantize_model, quantize_skeleton, skeleton_transform
# fmt: on

__all__ = [
    "BitsAndBytesLinear", "DEFAULT_GROUP_SIZE", "INT4_GROUP_SIZES", "INT8_GROUP_SIZE", "Int4Linear", "Int8Embedding",
    "Int8Linear", "LINEAR_SUFFIXES", "LLMInt8Linear", "LLM_INT8_THRESHOLD", "MODES", "QuantizedLinear",
    "default_calibration_text", "dequantize_int4", "gptq_int8_rows", "input_second_moments", "int8_matmul",
    "linear_mode", "main", "pack_nibbles", "quantize_checkpoint", "quantize_int4_groups", "quantize_int8_groups",
    "quantize_int8_rows", "quantize_model", "quantize_skeleton", "quantize_state_dict", "read_quantization",
    "skeleton_transform", "unpack_nibbles",
]  # fmt: skip

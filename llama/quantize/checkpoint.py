"""Quantized checkpoints: `python -m llama.quantize SRC DST --mode int8` and what it writes."""

import logging
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from llama.checkpoint import (
    IGNORED_KEYS,
    StateDict,
    copy_side_files,
    directory_when_complete,
    find_shards,
    load_model,
    load_shard,
    read_params,
    shard_file_name,
    write_params,
)
from llama.distributed import setup_model_parallel
from llama.model import ModelArgs
from llama.quantize.gptq import input_second_moments
from llama.quantize.kernels import (DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, INT8_GROUP_SIZE, quantize_int4_groups,
                                    quantize_int8_rows)
from llama.quantize.modules import Int8Linear
from llama.quantize.transform import MODES, check_mode, linear_mode
from llama.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# Meta names of the weights that quantize as linears (the rest: embedding, norms).
LINEAR_SUFFIXES = tuple(
    f"{name}.weight" for name in
    ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "output")
)  # fmt: skip


def read_quantization(params: dict) -> Optional[dict]:
    """{"mode", "group_size", "int8_group_size"} from a params.json dict, or None for an unquantized
    checkpoint. int8_group_size is None (one scale per row) where params.json has none: the int8
    linears of checkpoints written before int8 had groups."""
    quantization = params.get("quantization")
    if quantization is None:
        return None
    if not isinstance(quantization, dict) or quantization.get("mode") not in MODES:
        raise ValueError(f"params.json: 'quantization' must be {{'mode': one of {MODES}, 'group_size': int}}, "
                         f"got {quantization!r}")
    int8_group_size = quantization.get("int8_group_size")
    if int8_group_size is not None and (not isinstance(int8_group_size, int) or int8_group_size <= 0):
        raise ValueError(f"params.json: quantization.int8_group_size must be a positive int or null, "
                         f"got {int8_group_size!r}")
    result = {"mode": quantization["mode"], "group_size": int(quantization.get("group_size", DEFAULT_GROUP_SIZE)),
              "int8_group_size": int8_group_size}
    check_mode(result["mode"], result["group_size"])
    return result


@torch.no_grad()
def quantize_state_dict(
    state: StateDict, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
    moments: Optional[Dict[str, torch.Tensor]] = None, int8_group_size: Optional[int] = INT8_GROUP_SIZE,
) -> StateDict:
    """One shard's tensors quantized as `quantize_model` quantizes the model that loads it.

    moments: int8 only: {module name: H} from `llama.quantize.gptq.input_second_moments`, for GPTQ's rounding.
    int8_group_size: input columns per scale of the int8 linears (None: one per row).
    """
    check_mode(mode, group_size)
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
            grouped = linear_mode(mode, prefix[:-1]) == "int8"  # LLM.int8's rows keep one scale each
            int8_group = Int8Linear.group_size_for(tensor.shape[1], int8_group_size) if grouped else None
            out[name], out[prefix + "scales"] = Int8Linear.quantize(tensor, int8_group, moments.get(prefix[:-1]))
        else:
            out[name] = tensor.clone()  # norms: own storage, not a view of the source mapping
    return out


def quantize_checkpoint(
    src_dir: Union[str, Path], dst_dir: Union[str, Path], mode: str, group_size: int = DEFAULT_GROUP_SIZE,
    calibration_text: Optional[str] = None,
) -> None:
    """Writes a quantized copy of a Meta-format checkpoint, one shard at a time.

    Shards are written as consolidated.NN.pth (torch.save's format), whatever
    the source's; params.json gains {"quantization": {"mode": ..., "group_size": ..., "int8_group_size": ...}},
    which `read_quantization` reads back; the other files (tokenizer) are copied.
    With `calibration_text` (int8, one shard) the codes are chosen by GPTQ from
    the layers' inputs on that text, read with the checkpoint's tokenizer.model.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    shards = find_shards(src)
    params = read_params(src)
    check_mode(mode, group_size)
    if read_quantization(params) is not None:
        raise ValueError(f"{src} is quantized already ({params['quantization']}); quantize the original checkpoint")
    moments, int8_group_size = None, INT8_GROUP_SIZE
    if calibration_text is not None:
        moments = _calibration_moments(src, shards, params, mode, calibration_text)
    with directory_when_complete(dst) as tmp:
        for rank, shard in enumerate(shards):
            torch.save(quantize_state_dict(load_shard(shard), mode, group_size, moments, int8_group_size),
                       tmp / shard_file_name(rank))
        write_params(tmp, {**params, "quantization": {"mode": mode, "group_size": group_size,
                                                      "int8_group_size": int8_group_size}})
        copy_side_files(src, tmp)


def default_calibration_text() -> str:
    """A few thousand tokens of varied text (prose, dialogue, code, lists) shipped with the library."""
    return (Path(__file__).parent.parent / "data" / "calibration.txt").read_text(encoding="utf-8")


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

"""Quantization: each module against its own dequantized weights, weight memory,
quantized checkpoints loaded on the meta device, and top-1 agreement with fp32 on the bundled model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)

import llama.quantize as quantize
from llama import Llama, kernels
from llama.checkpoint import find_shards, load_model, load_shard, read_params, reshard
from llama.default_model import DEFAULT_MODEL_NAME, checkpoints_dir
from llama.model import ModelArgs
from llama.quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    LLMInt8Linear,
    quantize_checkpoint,
    quantize_int4_groups,
    quantize_model,
    quantize_state_dict,
    read_quantization,
    skeleton_transform,
)
from tests.conftest import TINY_PARAMS, random_state_dict, write_checkpoint
from tests.test_checkpoint import write_safetensors_checkpoint

# Shaped like SmolLM2 (dim 576, vocab 49152): embeddings are a large share of the weights.
SMOL_LIKE = {**TINY_PARAMS, "dim": 128, "vocab_size": 8192, "multiple_of": 64, "ffn_dim_multiplier": None}
ODD_WIDTH = {**SMOL_LIKE, "multiple_of": 160}  # SwiGLU width 480: a multiple of 32, not of 64


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def float_linear(kind: str, in_features: int, out_features: int, seed: int = 0):
    """A fairscale linear (column-parallel with gather_output, or row-parallel) with weights scaled like a
    trained model's."""
    if kind == "column":
        layer = ColumnParallelLinear(in_features, out_features, bias=False, gather_output=True)
    else:
        layer = RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True)
    generator = torch.Generator().manual_seed(seed)
    layer.weight.data = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return layer


def tiny_model(tmp_path, params=SMOL_LIKE, seed=0, max_seq_len=32):
    """(fp32 model, its checkpoint directory) for random weights of `params`."""
    ckpt = write_checkpoint(tmp_path / f"fp32-{seed}", params, random_state_dict(params, seed=seed))
    args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": 2})
    return load_model(find_shards(ckpt)[0], args, torch.device("cpu"), torch.float32), ckpt


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers as held in memory, KV caches and rotary table excluded."""
    runtime = {id(model.rope)} | {id(b) for layer in model.layers for b in layer.attention.cache.buffers()}
    tensors = [*model.parameters(), *(b for b in model.buffers() if id(b) not in runtime)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, None])  # the default: a scale per group of 32 columns; None: per row
@pytest.mark.parametrize("kind", ["column", "row"])
def test_int8_linear(kind, group_size):
    layer = float_linear(kind, 96, 48)
    q = Int8Linear.from_float(layer, group_size=group_size)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 96)
    assert q.scales.shape == ((48,) if group_size is None else (48, 3)) and q.group_size == group_size
    x = randn(2, 5, 96)
    out = q(x)  # CPU kernel on bf16 activations
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    reference = F.linear(x.bfloat16().float(), q.dequantize())
    assert (out - reference).abs().max() <= 2**-7 * reference.abs().max()  # bf16 output rounding
    assert relative_error(out, layer(x)) < 0.02


def test_int8_linear_fallback_path(monkeypatch):
    """Where the CPU kernels are unavailable (GPUs): dequantize-and-multiply in x's dtype."""
    q = Int8Linear.from_float(float_linear("column", 64, 40))
    x = randn(3, 64)
    monkeypatch.setattr(kernels, "usable", lambda *args, **kwargs: False)
    monkeypatch.setattr(quantize.modules, "_has_aten", lambda name: False)
    assert (q(x) - F.linear(x, q.dequantize())).abs().max() <= 1e-5


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, so no tinygemm kernel
@pytest.mark.parametrize("kernel", ["llama", "aten"])  # llama.kernels, or ATen's where they cannot run
def test_int4_linear(group_size, out_features, kernel, monkeypatch):
    if kernel == "aten":
        monkeypatch.setattr(kernels, "load", lambda: False)
        monkeypatch.setattr(kernels, "usable", lambda *args, **kwargs: False)
    elif not kernels.load():
        pytest.skip("llama.kernels cannot run here")
    layer = float_linear("row", 256, out_features)
    q = Int4Linear.from_float(layer, group_size)
    assert q.packing == ("blocks" if kernel == "llama" else "tinygemm" if out_features % 16 == 0 else None)
    x = randn(2, 3, 256)
    out = q(x)
    assert out.shape == (2, 3, out_features)
    reference = F.linear(x, q.dequantize())
    if q.packing == "blocks":  # activations quantized to int8 in blocks of 32 (tests/test_kernels.py)
        assert (out - reference).abs().max() <= 0.02 * reference.abs().max()
    elif q.packing == "tinygemm":  # activations in bf16
        reference = F.linear(x.bfloat16().float(), q.dequantize())
        assert (out - reference).abs().max() <= 2**-7 * reference.abs().max()
    else:
        assert (out - reference).abs().max() <= 1e-5
    assert relative_error(out, layer(x)) < 0.12

    # The state dict holds portable nibbles, whatever the in-memory layout, and loads back.
    nibbles, scales_and_zeros = quantize_int4_groups(layer.weight.detach(), group_size)
    state = q.state_dict()
    assert torch.equal(state["weight"], nibbles) and torch.equal(state["scales_and_zeros"], scales_and_zeros)
    with torch.device("meta"):
        skeleton = Int4Linear(256, out_features, "row", group_size=group_size, device="meta")
    skeleton.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(skeleton(x), out)


def test_int4_dequantization_matches_the_kernel_convention():
    """W ~= (code - 8) * scale + zero, scales_and_zeros (K/g, N, 2): what the CPU kernel computes."""
    weight = randn(32, 128)
    nibbles, sz = quantize_int4_groups(weight, 64)
    dequantized = quantize.dequantize_int4(nibbles, sz, 64)
    assert relative_error(dequantized, weight) < 0.1
    codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantize.unpack_nibbles(nibbles).int(), 1)
    eye = torch.eye(128, dtype=torch.bfloat16)
    kernel_weight = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, codes, 64, sz).T  # (N, K)
    assert (kernel_weight.float() - dequantized).abs().max() <= 2**-8 * dequantized.abs().max()


def llm_int8_reference(x, q: LLMInt8Linear, threshold=6.0):
    """The decomposition in float64: outlier columns against dequantized weights,
    the rest quantized per row to int8 and back."""
    x = x.double()
    w = q.weight.double() * q.scales.double()[:, None]
    outliers = (x.abs() > threshold).any(dim=0)
    regular = x.masked_fill(outliers, 0)
    scale = regular.abs().amax(dim=1, keepdim=True) / 127
    return (regular / scale).round() * scale @ w.T + x[:, outliers] @ w[:, outliers].T


def test_llm_int8_linear_decomposes_outlier_columns():
    layer = float_linear("column", 128, 64)
    q = LLMInt8Linear.from_float(layer)
    x = randn(6, 128)
    x[:, 5] *= 20  # an outlier feature, as large models grow them
    x[2, 77] = -9.0
    out = q(x)
    assert (out.double() - llm_int8_reference(x, q)).abs().max() <= 1e-5
    error = relative_error(out, layer(x))
    assert error < 0.03

    # Without the decomposition the outliers set the activation scale: far worse.
    q.threshold = float("inf")
    assert relative_error(q(x), layer(x)) > 2 * error


@pytest.mark.parametrize("embedding_class", [VocabParallelEmbedding, ParallelEmbedding])
def test_int8_embedding(embedding_class):
    embedding = embedding_class(1000, 64)
    embedding.weight.data = randn(1000, 64)
    q = Int8Embedding.from_float(embedding)
    tokens = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = q.weight[tokens].float() * q.scales[tokens][..., None]
    assert torch.equal(q(tokens), expected)
    assert relative_error(q(tokens), embedding(tokens)) < 0.01


# --- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4", "llm.int8"])
def test_quantize_model_swaps_every_layer(tmp_path, mode):
    model, _ = tiny_model(tmp_path)
    tokens = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens, 0)
        quantize_model(model, mode)
        got = model(tokens, 0)
    linear = {"int8": Int8Linear, "int4": Int4Linear, "llm.int8": LLMInt8Linear}[mode]
    assert type(model.layers[1].feed_forward.w2) is linear
    assert type(model.output) is (Int8Linear if mode == "int4" else linear)  # int4 keeps the output int8
    assert type(model.tok_embeddings) is Int8Embedding
    assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())
    assert got.dtype == torch.float32
    assert relative_error(got, expected) < (0.4 if mode == "int4" else 0.06)  # random weights are hard on int4


def test_int4_group_size_must_divide_every_layer(tmp_path):
    model, _ = tiny_model(tmp_path, ODD_WIDTH)
    with pytest.raises(ValueError, match=r"feed_forward.w2.*use group_size=32"):
        quantize_model(model, "int4", group_size=64)
    assert isinstance(model.layers[0].attention.wq, ColumnParallelLinear)  # nothing swapped
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_model(model, "int3")


def test_weight_memory(tmp_path):
    model, _ = tiny_model(tmp_path)
    fp32 = weight_bytes(model)
    ratios = {}
    for mode in ("int8", "llm.int8", "int4"):
        quantized, _ = tiny_model(tmp_path / mode)
        ratios[mode] = weight_bytes(quantize_model(quantized, mode)) / fp32
    print("weight memory vs fp32:", {mode: round(r, 3) for mode, r in ratios.items()})
    assert ratios["int8"] <= 0.27 and ratios["llm.int8"] <= 0.27
    assert ratios["int4"] < ratios["int8"]


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4", "llm.int8"])
def test_quantized_checkpoint_loads_on_meta_with_identical_logits(tmp_path, mode):
    in_memory, src = tiny_model(tmp_path)
    (src / "tokenizer.model").write_text("not really a tokenizer")
    quantize_model(in_memory, mode)

    dst = tmp_path / "quantized"
    quantize_checkpoint(src, dst, mode)
    params = read_params(dst)
    assert read_quantization(params) == {"mode": mode, "group_size": quantize.DEFAULT_GROUP_SIZE,
                                         "int8_group_size": quantize.INT8_GROUP_SIZE}
    assert (dst / "tokenizer.model").read_text() == "not really a tokenizer"

    # The shard holds what the in-memory model's state dict holds, bit for bit.
    shard = torch.load(find_shards(dst)[0], weights_only=True)
    state = in_memory.state_dict()
    assert shard.keys() == state.keys()
    assert all(torch.equal(shard[name], state[name]) for name in state)

    args = ModelArgs.from_params({**SMOL_LIKE, "max_seq_len": 32, "max_batch_size": 2})
    loaded = load_model(find_shards(dst)[0], args, torch.device("cpu"), torch.float32,
                        skeleton_transform(read_quantization(params)))
    assert loaded.layers[0].attention.cache.k.dtype == torch.float32
    wq = loaded.layers[0].attention.wq
    assert (wq.scales if mode != "int4" else wq.scales_and_zeros).dtype == torch.bfloat16  # as the kernels take
    tokens = torch.randint(0, 8192, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, 0), in_memory(tokens, 0))

    other = {"mode": "int8" if mode == "int4" else "int4", "group_size": 32, "int8_group_size": 32}
    with pytest.raises(ValueError, match="does not match"):
        load_model(find_shards(dst)[0], args, torch.device("cpu"), torch.float32, skeleton_transform(other))


def test_int8_checkpoints_with_a_scale_per_row_still_load(tmp_path):
    """Checkpoints written before int8 had groups of columns: per-row scales, no int8_group_size in params.json."""
    fp32, src = tiny_model(tmp_path)
    dst = tmp_path / "rows"
    dst.mkdir()
    torch.save(quantize_state_dict(load_shard(find_shards(src)[0]), "int8", int8_group_size=None),
               dst / "consolidated.00.pth")
    params = {**read_params(src), "quantization": {"mode": "int8", "group_size": 32}}
    assert read_quantization(params)["int8_group_size"] is None
    args = ModelArgs.from_params({**SMOL_LIKE, "max_seq_len": 32, "max_batch_size": 2})
    loaded = load_model(find_shards(dst)[0], args, torch.device("cpu"), torch.float32,
                        skeleton_transform(read_quantization(params)))
    wq = loaded.layers[0].attention.wq
    assert wq.group_size is None
    q, scales = quantize.quantize_int8_rows(fp32.layers[0].attention.wq.weight)
    assert torch.equal(wq.weight, q) and torch.equal(wq.scales, scales)
    tokens = torch.randint(0, 8192, (1, 11), generator=torch.Generator().manual_seed(1))  # the kernels' rows
    with torch.no_grad():
        assert relative_error(loaded(tokens, 0), fp32(tokens, 0)) < 0.05  # measured 0.028


def test_quantize_cli_and_errors(tmp_path):
    _, src = tiny_model(tmp_path, ODD_WIDTH)
    dst = tmp_path / "int4"
    quantize.main([str(src), str(dst), "--mode", "int4", "--group-size", "32"])
    assert read_quantization(read_params(dst)) == {"mode": "int4", "group_size": 32, "int8_group_size": 32}
    with pytest.raises(FileExistsError):
        quantize.main([str(src), str(dst), "--mode", "int8"])
    with pytest.raises(ValueError, match="quantized already"):
        quantize_checkpoint(dst, tmp_path / "twice", "int8")
    with pytest.raises(ValueError, match="use group_size=32"):
        quantize_checkpoint(src, tmp_path / "g64", "int4", group_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32-0", "int4"]  # no partial directory left

    assert read_quantization({"dim": 64}) is None
    with pytest.raises(ValueError, match="quantization"):
        read_quantization({"quantization": {"mode": "fp8"}})


def test_quantizing_a_safetensors_checkpoint_stores_int8(tmp_path, tiny_checkpoints, llama3_tokenizer_path):
    """The int8 shard is written as consolidated.00.pth, and the fp32 safetensors shard is not copied over it."""
    src = write_safetensors_checkpoint(tmp_path / "fp32", TINY_PARAMS, random_state_dict(TINY_PARAMS, seed=0))
    (src / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    quantize_checkpoint(src, tmp_path / "int8", "int8")
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["consolidated.00.pth", "params.json",
                                                                     "tokenizer.model"]
    shard = torch.load(tmp_path / "int8" / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].dtype == torch.int8
    assert shard["output.weight"].dtype == torch.int8 and shard["tok_embeddings.weight"].dtype == torch.int8
    assert shard["layers.0.attention.wq.scales"].dtype == torch.bfloat16
    assert shard["norm.weight"].dtype == torch.float32
    assert safetensors.torch.load_file(src / "consolidated.00.safetensors")["output.weight"].dtype == torch.float32

    llama = Llama.build(tmp_path / "int8", tmp_path / "int8" / "tokenizer.model", max_seq_len=32, max_batch_size=1)
    assert isinstance(llama.model.layers[0].attention.wqkv, Int8Linear)  # wq, wk, wv stacked at load
    tokens, _ = llama.generate([[128000, 791, 6864]], max_gen_len=4, temperature=0)
    assert len(tokens[0]) > 0


SHARDED_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import fairscale.nn.model_parallel.initialize as fs_init
from llama.checkpoint import find_shards, load_model, read_params, reshard
from llama.distributed import setup_model_parallel
from llama.model import ModelArgs
from llama.quantize import quantize_model, read_quantization, skeleton_transform

setup_model_parallel(None, torch.device("cpu"))
rank = fs_init.get_model_parallel_rank()
results = {}
for src, dst in json.loads(sys.argv[1]):
    quantization = read_quantization(read_params(Path(dst)))
    args = lambda: ModelArgs.from_params({**read_params(Path(src)), "max_seq_len": 16, "max_batch_size": 2})
    fp32 = load_model(find_shards(Path(src))[rank], args(), torch.device("cpu"), torch.float32)
    loaded = load_model(find_shards(Path(dst))[rank], args(), torch.device("cpu"), torch.float32,
                        skeleton_transform(quantization))
    tokens = torch.randint(0, 8192, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = fp32(tokens, 0), loaded(tokens, 0)
        in_memory = quantize_model(fp32, quantization["mode"], group_size=quantization["group_size"])(tokens, 0)
    results[dst] = {"error": ((got - expected).norm() / expected.norm()).item(),
                    "equal": torch.equal(got, in_memory), "split": loaded.tok_embeddings.split}
if rank == 0:
    Path(sys.argv[2]).write_text(json.dumps(results))
"""


def test_sharded_quantized_checkpoints_under_torchrun(tmp_path):
    """Two ranks, embeddings split along the vocabulary (Llama 3) and along the dimension (Llama 2)."""
    _, src = tiny_model(tmp_path)
    runs = []
    for split, mode in [("vocab", "int4"), ("dim", "llm.int8")]:  # int4 keeps output int8: all 3 linears
        sharded = tmp_path / f"two-{split}"
        reshard(src, sharded, 2, embedding_split=split)
        quantize_checkpoint(sharded, tmp_path / f"two-{split}-{mode}", mode)
        runs.append((str(sharded), str(tmp_path / f"two-{split}-{mode}")))
    script, out = tmp_path / "sharded.py", tmp_path / "results.json"
    script.write_text(SHARDED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), json.dumps(runs), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    assert [r["split"] for r in results.values()] == ["vocab", "dim"]
    assert all(r["equal"] for r in results.values())  # checkpoint == quantized in memory, on every rank
    errors = [r["error"] for r in results.values()]
    assert errors[0] < 0.4 and errors[1] < 0.06, errors  # as with one rank


def test_build_quantizes_at_load_time(tiny_checkpoints, llama3_tokenizer_path):
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=32, max_batch_size=2,
                        quantize="int8")
    assert isinstance(llama.model.output, Int8Linear)
    tokens, _ = llama.generate([[128000, 791, 6864]], max_gen_len=4, temperature=0)
    assert len(tokens[0]) > 0


# --- the bundled model ----------------------------------------------------------------------------

TEXT = """The history of the lighthouse is, in many ways, the history of coastal trade. Long before \
electric lamps and automatic beacons, sailors relied on fires lit on hilltops to warn them away from \
rocks and to guide them into safe harbours. The most famous of the ancient lights stood on the island \
of Pharos, near Alexandria, and for centuries it was counted among the wonders of the world. \
Travellers wrote that its flame could be seen from many miles out at sea, although those accounts \
were probably exaggerated.

In the eighteenth and nineteenth centuries, engineers began to build towers of stone on exposed reefs, \
where the sea broke over the foundations in every storm. The work was slow and dangerous. Masons could \
only reach the rock at low tide, and a single summer might see just a few courses of granite laid and \
fixed in place. Each block was cut on the mainland so that it locked into its neighbours, and the \
finished tower behaved almost like a single piece of rock.

The keepers who lived in these towers led quiet, disciplined lives. They trimmed the wicks, polished \
the lenses, wound the clockwork that turned the lamp, and wrote careful notes about the weather in a \
logbook. Supplies arrived by boat when the sea allowed, which in winter could mean weeks of waiting. \
Many keepers later said that they enjoyed the solitude, the long evenings of reading, and the sense \
that their work kept other people safe."""

# Measured on this text: int8 94.1%, int4 (groups of 32, int8 output) 96.1%, llm.int8 88.3%.
# SmolLM2-135M is small and was itself distributed 4-bit: per-row int8 adds ~1% weight noise
# to every projection, and LLM.int8's per-row int8 activations ~2% more.
MIN_AGREEMENT = {"int8": 0.95, "int4": 0.90, "llm.int8": 0.86}


@pytest.mark.parametrize("mode", ["int8", "int4", "llm.int8"])
def test_build_loads_a_quantized_checkpoint(tmp_path, tiny_checkpoints, llama3_tokenizer_path, mode):
    """`Llama.build` on a checkpoint written by `python -m llama.quantize` gives what quantizing
    at load time gives, bit for bit: its separate wq, wk, wv (w1, w3) are stacked into one layer as
    the fp32 ones are (a row's codes and scales do not depend on the other rows), so both run the
    same kernels. Such a checkpoint is neither quantized again nor resharded."""
    src = tiny_checkpoints["gqa"]
    quantize.main([str(src), str(tmp_path / mode), "--mode", mode])
    loaded = Llama.build(tmp_path / mode, llama3_tokenizer_path, max_seq_len=32, max_batch_size=2)
    at_load = Llama.build(src, llama3_tokenizer_path, max_seq_len=32, max_batch_size=2, quantize=mode)
    kind = {"int8": Int8Linear, "int4": Int4Linear, "llm.int8": LLMInt8Linear}[mode]
    for model in (loaded.model, at_load.model):
        layer = model.layers[0]
        assert type(layer.attention.wqkv) is kind and type(layer.feed_forward.w13) is kind
        assert layer.attention.wq is None and layer.feed_forward.w1 is None
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens, 0), at_load.model(tokens, 0))
    with pytest.raises(ValueError, match="already quantized"):
        Llama.build(tmp_path / mode, llama3_tokenizer_path, 32, 2, quantize="int4")
    with pytest.raises(ValueError, match="cannot be resharded"):
        reshard(tmp_path / mode, tmp_path / "two", 2)


@pytest.fixture(scope="module")
def bundled():
    """(load, tokens, fp32 logits, fp32 weight bytes) for SmolLM2-135M-Instruct, 256 positions of TEXT."""
    ckpt_dir = checkpoints_dir() / DEFAULT_MODEL_NAME
    if not (ckpt_dir / "params.json").is_file():
        pytest.skip(f"the bundled checkpoint is not provisioned at {ckpt_dir} (python -m llama.default_model)")
    from llama.tokenizer import load_tokenizer

    ids = load_tokenizer(ckpt_dir / "tokenizer.model").encode(TEXT, bos=True, eos=False)
    assert len(ids) >= 256
    tokens = torch.tensor([ids[:256]])
    # 4 rows: GPTQ's calibration (tests/test_gptq.py) reads 4 x 256 tokens.
    args = ModelArgs.from_params({**read_params(ckpt_dir), "max_seq_len": 256, "max_batch_size": 4})

    def load():
        return load_model(find_shards(ckpt_dir)[0], args, torch.device("cpu"), torch.float32)

    model = load()
    with torch.no_grad():
        logits = model(tokens, 0)
    return load, tokens, logits, weight_bytes(model)


@torch.no_grad()
def decode_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The logits at every position as decode steps compute them: a few positions per pass, the rows
    that `llama.kernels` multiply (a one-pass prefill would take PyTorch's GEMM instead)."""
    step = kernels.MAX_ROWS
    return torch.cat([model(tokens[:, i:i + step], i) for i in range(0, tokens.shape[1], step)], dim=1)


@pytest.mark.parametrize("mode", ["int8", "int4", "llm.int8"])
def test_top1_agreement_with_fp32_on_the_bundled_model(bundled, mode):
    load, tokens, fp32_logits, fp32_bytes = bundled
    model = quantize_model(load(), mode)
    logits = decode_logits(model, tokens)
    agreement = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    memory = weight_bytes(model) / fp32_bytes
    print(f"SmolLM2 {mode}: top-1 agreement {agreement:.1%} over 256 positions, weight memory {memory:.3f}x fp32")
    assert agreement >= MIN_AGREEMENT[mode], f"{mode}: top-1 agreement {agreement:.1%}"
    if mode != "int4":
        assert memory <= 0.27

"""The CPU decoding kernels (llama/kernels/decode.cpp) against references computed here in float64:
fp32 weights against x Wᵀ; int8 and int4 weights against the same products with the activations
quantized in blocks of 32 as the kernels do (int16 for int8 weights, int8 for int4), and against
the unquantized products."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llama import kernels
from llama.model import ModelArgs, Transformer
from llama.parallel import make_compilable
from llama.quantize.kernels import (dequantize_int4, quantize_int4_groups, quantize_int8_groups, quantize_int8_rows,
                                    unpack_nibbles)
from llama.quantize.transform import quantize_model
from tests.conftest import TINY_PARAMS, random_state_dict

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the CPU kernels need Linux on x86-64 with AVX2")

ROWS = [1, 2, 3, 5, 8, 16]  # rows of activations: odd counts take the kernels' tail paths
SHAPES = [(37, 64), (100, 192), (576, 96)]  # (N, K): N not a multiple of the 4-row tiles, too


def quantized_activations(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x with each block of 32 columns rounded to steps of max|block| / levels (ties to even), the codes
    computed in fp32 as the kernel does (x times levels / max|block|)."""
    blocks = x.float().view(*x.shape[:-1], -1, 32)
    max_abs = blocks.abs().amax(-1, keepdim=True)
    # a tensor divided, not `levels / max_abs` (which torch computes as max_abs.reciprocal() * levels)
    inverse = torch.where(max_abs > 0, torch.full_like(max_abs, levels) / max_abs, torch.zeros_like(max_abs))
    codes = torch.round(blocks * inverse)  # fp32 products, as in the kernel
    return (codes.double() * (max_abs / levels).double()).view(x.shape)


def assert_close(out: torch.Tensor, reference: torch.Tensor, tolerance: float):
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert (out.double() - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp32(rows, n, k):
    torch.manual_seed(rows * n)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    assert_close(kernels.linear_f32(x, w), x.double() @ w.double().T, 1e-6)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k,group_size", [(n, k, g) for n, k in SHAPES for g in (0, 32, 64) if k % (g or k) == 0])
def test_int8(rows, n, k, group_size):
    """group_size 0: a scale per row (the kernel's group of k columns); else per row and group of columns."""
    torch.manual_seed(rows * n + group_size + 1)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    if group_size == 0:
        q, scales = quantize_int8_rows(w)
        dequantized = q.double() * scales.double()[:, None]
    else:
        q, scales = quantize_int8_groups(w, group_size)  # (N, K), (N, K/group_size)
        dequantized = (q.double().view(n, -1, group_size) * scales.double()[..., None]).view(n, k)
    out = kernels.linear_int8(x, q, scales, group_size or k)
    assert_close(out, quantized_activations(x, 32767) @ dequantized.T, 1e-6)
    assert_close(out, x.double() @ dequantized.T, 1e-4)  # int16 activations cost almost nothing


@pytest.mark.parametrize("group_size,k", [(32, 256), (64, 256), (128, 256), (32, 96), (96, 288)])
@pytest.mark.parametrize("rows", ROWS)
def test_int4(rows, group_size, k):
    """Blocks of 32 columns are read in pairs: an odd count (k = 96 or 288) ends with a block read
    alone, and groups of 3 blocks (96) put the two blocks of some pairs in different groups."""
    torch.manual_seed(rows + group_size + k)
    x, w = torch.randn(rows, k), torch.randn(45, k)
    nibbles, scales_and_zeros = quantize_int4_groups(w, group_size)  # (N, K/2), (G, N, 2)
    dequantized = dequantize_int4(nibbles, scales_and_zeros, group_size).double()
    packed = kernels.pack_int4_blocks(unpack_nibbles(nibbles))
    out = kernels.linear_int4(x, packed, kernels.pack_int4_scales(scales_and_zeros), group_size)
    assert_close(out, quantized_activations(x, 127) @ dequantized.T, 1e-5)
    assert_close(out, x.double() @ dequantized.T, 0.02)  # what quantizing the activations costs
    # the fp32 weight a prefill multiplies, from the same layout
    assert_close(kernels.dequantize_int4(packed, kernels.pack_int4_scales(scales_and_zeros), group_size), dequantized,
                 1e-6)


def test_int4_block_layout_round_trips():
    codes = torch.randint(0, 16, (7, 96), dtype=torch.uint8)
    packed = kernels.pack_int4_blocks(codes)
    assert packed.shape == (7, 48)
    # byte j of a block: column j in the low nibble, column j + 16 in the high one
    assert int(packed[3, 5]) == int(codes[3, 5]) | int(codes[3, 21]) << 4
    assert int(packed[3, 16 + 2]) == int(codes[3, 32 + 2]) | int(codes[3, 32 + 18]) << 4
    assert torch.equal(kernels.unpack_int4_blocks(packed), codes)
    # scales and zeros: (G, N, 2) -> per tile of 4 rows and group, 4 scales then 4 zeros
    scales_and_zeros = torch.randn(3, 7, 2).bfloat16()
    tiled = kernels.pack_int4_scales(scales_and_zeros)
    assert tiled.shape == (2, 3, 2, 4)
    assert tiled[1, 2, 0, 1] == scales_and_zeros[2, 5, 0] and tiled[1, 2, 1, 2] == scales_and_zeros[2, 6, 1]
    assert torch.all(tiled[1, :, :, 3] == 0)  # row 7 does not exist
    assert torch.equal(kernels.unpack_int4_scales(tiled, 7), scales_and_zeros)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int8 per row", "int4"])
def test_a_row_gets_the_same_result_whatever_rows_come_with_it(kind):
    """Bit for bit: a speculative verify pass of k positions computes the logits of k decode steps."""
    torch.manual_seed(3)
    x, w = torch.randn(9, 160), torch.randn(50, 160)  # 5 blocks of 32: two pairs and one alone
    if kind == "fp32":
        run = lambda rows: kernels.linear_f32(rows, w)  # noqa: E731
    elif kind.startswith("int8"):
        group_size = 160 if kind == "int8 per row" else 32
        q, scales = quantize_int8_rows(w) if kind == "int8 per row" else quantize_int8_groups(w, group_size)
        run = lambda rows: kernels.linear_int8(rows, q, scales, group_size)  # noqa: E731
    else:
        nibbles, sz = quantize_int4_groups(w, 32)
        packed, row_sz = kernels.pack_int4_blocks(unpack_nibbles(nibbles)), kernels.pack_int4_scales(sz)
        run = lambda rows: kernels.linear_int4(rows, packed, row_sz, 32)  # noqa: E731
    together = run(x)
    for i in range(len(x)):
        assert torch.equal(run(x[i:i + 1]), together[i:i + 1])


def test_leading_dimensions_and_non_contiguous_inputs():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 128).transpose(0, 1)  # (3, 2, 128), not contiguous
    w = torch.randn(20, 128)
    assert_close(kernels.linear_f32(x, w), x.double() @ w.double().T, 1e-6)


def reference_attention(q, keys, values, mask):
    """float64 softmax attention, keys/values repeated for the query heads that share them."""
    repeat = q.shape[1] // keys.shape[1]
    k, v = keys.double().repeat_interleave(repeat, 1), values.double().repeat_interleave(repeat, 1)
    scores = q.double() @ k.transpose(2, 3) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 48)])
def test_decode_attention(heads, kv_heads, head_dim):
    """Rows at their own positions over a cache of 200 (a compiled step's mask), one shared mask, none,
    and a mask with holes; the keys and values a slice of a longer cache, as the model passes them."""
    torch.manual_seed(heads + head_dim)
    q = torch.randn(3, heads, 1, head_dim)
    cache = torch.randn(2, 4, kv_heads, 256, head_dim)  # (k/v, max batch, Hkv, max positions, hd)
    keys, values = cache[0, :3, :, :200], cache[1, :3, :, :200]
    positions = torch.tensor([17, 199, 0])
    per_row = (torch.arange(200)[None, None, None, :] <= positions[:, None, None, None])  # (3, 1, 1, 200)
    holes = per_row & (torch.arange(200) % 3 != 1)
    for mask in (per_row, per_row[1:2], None, holes):
        out = kernels.decode_attention(q, keys, values, mask)
        assert out.shape == q.shape
        assert_close(out, reference_attention(q, keys, values, mask), 1e-6)


def test_decode_attention_reads_only_visible_positions():
    """Past a row's last visible position the cache may hold anything (a filler row sees nothing: zeros)."""
    torch.manual_seed(6)
    q, keys, values = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 64, 32), torch.randn(2, 2, 64, 32)
    mask = (torch.arange(64)[None, None, None, :] <= torch.tensor([9, -1])[:, None, None, None])
    expected = kernels.decode_attention(q, keys, values, mask)
    keys[:, :, 10:], values[:, :, 10:] = float("nan"), float("nan")
    out = kernels.decode_attention(q, keys, values, mask)
    assert torch.equal(out, expected) and torch.equal(out[1], torch.zeros_like(out[1]))


BLOCK_PARAMS = {**TINY_PARAMS, "vocab_size": 256}  # dim 64, 4 heads of 16, 2 KV heads, SwiGLU width 224


def engine_model(mode: str, params=BLOCK_PARAMS, max_batch_size=4, max_seq_len=48) -> Transformer:
    """A random-weight model laid out as the engine runs it: fused projections, fairscale's layers swapped
    for their twins, the linears quantized as `mode` says."""
    model = Transformer(ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size))
    model.load_state_dict(random_state_dict(params), strict=False)
    make_compilable(model.fuse_projections())
    if mode != "fp32":
        quantize_model(model, mode)
    return model


def python_block(layer, x, positions, rope, kv_len):
    """TransformerBlock's own PyTorch code: project, write the cache, attend, feed-forward."""
    mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None])[:, None]  # (B or 1, 1, 1, S)
    q, (k, v) = layer.attention_inputs(x, rope)
    keys, values = layer.attention.cache.update(positions, k, v, kv_len)
    return layer.attention_and_feed_forward(x, q, keys, values, mask)


@pytest.mark.parametrize("mode", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_decode_block_computes_the_transformer_block(mode, n_kv_heads):
    """One C++ call against the block's PyTorch code, one and several new tokens per row (a decode
    step, a speculative verify pass), rows at their own positions and all at the same ones:
    the same output and the same keys and values written. fp32 is checked against float64 (the PyTorch
    code run on a float64 copy, which the kernels do not take); int8 and int4 against the PyTorch code
    on the same weights (whose products are the same kernels: this checks everything around them)."""
    torch.manual_seed(n_kv_heads)
    model = engine_model(mode, {**BLOCK_PARAMS, "n_kv_heads": n_kv_heads})
    layer, cache = model.layers[1], model.layers[1].attention.cache
    with torch.inference_mode():
        model.forward_hidden(torch.randint(0, 256, (3, 30)), 0)  # positions 0..29 of rows 0..2 filled
        reference_layer = layer
        if mode == "fp32":
            reference_layer = copy.deepcopy(layer).double()
        for positions in (torch.tensor([[30], [4], [29]]), torch.tensor([[30]]),  # decode steps
                          torch.tensor([[30, 31, 32], [4, 5, 6], [29, 30, 31]]), torch.tensor([[30, 31]])):  # verify
            x = torch.randn(3, positions.shape[1], 64)
            rope = model.rope[positions]  # (B or 1, 1, hd/2, 2)
            assert layer.kernel_linears(x) is not None
            before = cache.k.clone(), cache.v.clone()
            reference_layer.attention.cache.k.copy_(before[0]), reference_layer.attention.cache.v.copy_(before[1])
            inputs = (x, rope) if mode != "fp32" else (x.double(), rope.double())
            expected = python_block(reference_layer, inputs[0], positions, inputs[1], 48)
            out = layer(x, positions, rope, None, 48)  # the block takes the kernel
            tolerance = 1e-5 if mode != "int8" else 3e-5  # int8: activations rounded to int16 differently
            assert_close(out, expected.double(), tolerance)
            for written, reference in ((cache.k, reference_layer.attention.cache.k),
                                       (cache.v, reference_layer.attention.cache.v)):
                assert_close(written, reference.double(), 1e-5)
            # Only the new positions were written.
            changed = (cache.k != before[0]).any(-1)  # (max batch, Hkv, S)
            rows = torch.arange(3)[:, None]  # (B, 1), with positions (1 or B, T)
            expected_changed = torch.zeros_like(changed)
            expected_changed[rows, :, positions] = True
            assert torch.equal(changed, expected_changed)


@pytest.mark.parametrize("mode", ["fp32", "int4"])
def test_a_verify_pass_gives_the_single_token_steps_outputs(mode):
    """Bit for bit: the block's output for k tokens in one call is that of k one-token calls (what keeps
    speculative decoding's greedy tokens those of plain decoding)."""
    torch.manual_seed(7)
    model = engine_model(mode)
    layer = model.layers[0]
    with torch.inference_mode():
        model.forward_hidden(torch.randint(0, 256, (2, 10)), 0)
        x, positions = torch.randn(2, 4, 64), torch.tensor([[10, 11, 12, 13], [3, 4, 5, 6]])
        together = layer(x, positions, model.rope[positions], None, 48)
        for t in range(4):
            one = positions[:, t:t + 1]
            assert torch.equal(layer(x[:, t:t + 1], one, model.rope[one], None, 48), together[:, t:t + 1])


def test_decode_block_runs_where_it_applies_only():
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        assert engine_model("int4").layers[0].kernel_linears(x) is not None
        assert engine_model("int4").layers[0].kernel_linears(torch.randn(2, 9, 64)) is None  # 18 rows: a prefill
        assert engine_model("llm.int8").layers[0].kernel_linears(x) is None  # its own outlier product
        unfused = Transformer(ModelArgs.from_params(BLOCK_PARAMS, max_seq_len=16, max_batch_size=2))
        assert make_compilable(unfused).layers[0].kernel_linears(x) is None  # three projections, not wqkv
        assert engine_model("fp32").layers[0].kernel_linears(x.double()) is None
    with torch.enable_grad():
        assert engine_model("fp32").layers[0].kernel_linears(x.requires_grad_()) is None


def test_decode_block_errors():
    model = engine_model("fp32")
    layer = model.layers[0]
    attn = layer.attention
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the cache"):
        kernels.decode_block(torch.randn(1, 1, 64), layer.attention_norm.weight, layer.ffn_norm.weight, 1e-5,
                             model.rope[torch.tensor([[0]])], torch.tensor([[48]]), attn.cache.k, attn.cache.v, 4,
                             layer.kernel_linears(torch.randn(1, 1, 64)))


def test_usable():
    x = torch.randn(4, 64)
    assert kernels.usable(x, 64)
    assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 64), 64)  # prefill: MKL's GEMM
    assert kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 64), 64, max_rows=None)  # attention: any rows
    assert not kernels.usable(x.bfloat16(), 64)
    assert not kernels.usable(x, 60)  # in_features not a multiple of 8
    assert not kernels.usable(x, 64 + 8, multiple=kernels.BLOCK)
    with torch.enable_grad():
        assert not kernels.usable(x.requires_grad_(), 64)  # the kernels have no backward
    with torch.inference_mode():
        assert kernels.usable(x, 64)


def test_the_kernels_run_inside_compiled_code():
    torch.manual_seed(5)
    w = torch.randn(24, 64)
    step = torch.compile(lambda x: F.silu(kernels.linear_f32(x, w)) * 2, fullgraph=True)
    x = torch.randn(2, 64)
    assert torch.equal(step(x), F.silu(kernels.linear_f32(x, w)) * 2)


def test_errors_name_the_wrong_argument():
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.llama_kernels.linear_f32(torch.randn(2, 64).double(), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.llama_kernels.linear_f32(torch.randn(2, 60), torch.randn(8, 60))
    with pytest.raises(RuntimeError, match="scales must be contiguous bf16"):
        torch.ops.llama_kernels.linear_int8(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8),
                                            64)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 32"):
        torch.ops.llama_kernels.linear_int8(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8),
                                            torch.ones(8, 4).bfloat16(), 16)
    with pytest.raises(RuntimeError, match="mask must be contiguous bool"):
        torch.ops.llama_kernels.decode_attention(torch.randn(1, 2, 32), torch.randn(1, 1, 5, 32),
                                                 torch.randn(1, 1, 5, 32), torch.ones(1, 5))

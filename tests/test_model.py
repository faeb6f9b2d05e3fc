"""The model against an independent implementation (transformers' LlamaForCausalLM)."""

import logging

import pytest
import torch

from llama.checkpoint import _skip_fairscale_init, load_model
from llama.model import ModelArgs, Transformer
from tests.conftest import TINY_PARAMS, random_state_dict

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa-scaled-rope": TINY_PARAMS,
    "mha-plain-rope": {**TINY_PARAMS, "n_kv_heads": None, "use_scaled_rope": False, "rope_theta": 10000.0},
}


def meta_to_hf_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (0,1), (2,3)...; HF rotates halves (0, hd/2), (1, hd/2+1)...
    Reorder each head's output rows from the first layout to the second."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_model_from_meta(params: dict, state: dict) -> "transformers.LlamaForCausalLM":
    args = ModelArgs.from_params(params)
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=4096,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )
    hf_state = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
                "model.norm.weight": state["norm.weight"],
                "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        hf_state.update({
            hf + "self_attn.q_proj.weight": meta_to_hf_qk(state[meta + "attention.wq.weight"], args.n_heads),
            hf + "self_attn.k_proj.weight": meta_to_hf_qk(state[meta + "attention.wk.weight"], args.n_kv_heads),
            hf + "self_attn.v_proj.weight": state[meta + "attention.wv.weight"],
            hf + "self_attn.o_proj.weight": state[meta + "attention.wo.weight"],
            hf + "mlp.gate_proj.weight": state[meta + "feed_forward.w1.weight"],
            hf + "mlp.up_proj.weight": state[meta + "feed_forward.w3.weight"],
            hf + "mlp.down_proj.weight": state[meta + "feed_forward.w2.weight"],
            hf + "input_layernorm.weight": state[meta + "attention_norm.weight"],
            hf + "post_attention_layernorm.weight": state[meta + "ffn_norm.weight"],
        })
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(hf_state, strict=True)
    return model


def our_model(tmp_path, params, state, max_seq_len=4096, max_batch_size=2):
    path = tmp_path / "consolidated.00.pth"
    torch.save(state, path)
    args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    return load_model(path, args, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    params = CONFIGS[name]
    state = random_state_dict(params, seed=3)
    ours = our_model(tmp_path, params, state)
    reference = hf_model_from_meta(params, state)

    # Long enough (and offset far enough) that the scaled rope frequencies matter.
    tokens = torch.randint(0, params["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = ours(tokens, 0)
    assert got.dtype == torch.float32
    max_diff = (got - expected).abs().max().item()
    assert max_diff <= 1e-4, f"max |Δlogits| = {max_diff:.2e}"

    # Positions far into the context, through the cache: prefill 3000 positions in chunks.
    long_tokens = torch.randint(0, params["vocab_size"], (1, 3000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(long_tokens).logits[:, -8:]
        for start in range(0, 2992, 748):
            ours(long_tokens[:, start : start + 748], start)
        got = ours(long_tokens[:, 2992:], 2992)
    max_diff = (got - expected).abs().max().item()
    assert max_diff <= 1e-4, f"max |Δlogits| at positions 2992..2999 = {max_diff:.2e}"


def test_kv_cache_decoding_equals_full_recomputation(tmp_path):
    state = random_state_dict(TINY_PARAMS, seed=4)
    model = our_model(tmp_path, TINY_PARAMS, state, max_seq_len=64)
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens, 0)  # every position at once
        incremental = [model(tokens[:, :10], 0)]  # a prefill, then one token per call
        incremental += [model(tokens[:, pos : pos + 1], pos) for pos in range(10, 24)]
    incremental = torch.cat(incremental, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_forward_allows_gradients(tmp_path):
    """Research code differentiates through forward: it must not run under inference_mode."""
    state = random_state_dict(TINY_PARAMS, seed=5)
    model = our_model(tmp_path, TINY_PARAMS, state, max_seq_len=16)
    tokens = torch.tensor([[1, 2, 3, 4]])
    embeddings = model.tok_embeddings.weight
    logits = model(tokens, 0)
    logits[0, -1, 7].backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_model_args_from_params(caplog):
    with caplog.at_level(logging.WARNING, logger="llama.model"):
        args = ModelArgs.from_params({"dim": 64, "n_heads": 8, "some_future_key": 1})
    assert "some_future_key" in caplog.text
    assert args.n_kv_heads == 8  # absent means one kv head per query head
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs.from_params({"dim": 64, "n_heads": 8, "n_kv_heads": 3})


def test_feed_forward_hidden_size_follows_the_reference_rule():
    # Llama 3 8B: dim 4096, multiple_of 1024, ffn_dim_multiplier 1.3 -> 14336.
    params = {"dim": 4096, "n_layers": 1, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "multiple_of": 1024, "ffn_dim_multiplier": 1.3}
    with torch.device("meta"), _skip_fairscale_init():
        model = Transformer(ModelArgs.from_params(params))
    assert model.layers[0].feed_forward.w1.weight.shape == (14336, 4096)
    assert model.layers[0].attention.wk.weight.shape == (1024, 4096)


def test_rows_at_their_own_positions_equal_separate_runs(tmp_path):
    """A (B,) start_pos runs each row at its own position: the same as running the rows alone."""
    state = random_state_dict(TINY_PARAMS, seed=6)
    model = our_model(tmp_path, TINY_PARAMS, state, max_seq_len=64, max_batch_size=3)
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 2)]
    with torch.no_grad():
        alone = []
        for prompt in prompts:  # prefill, then one more token at the next position
            model(prompt[None, :-1], 0)
            alone.append(model(prompt[None, -1:], len(prompt) - 1)[0, -1])
        padded = torch.zeros(3, 8, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt) - 1] = prompt[:-1]
        model(padded, torch.zeros(3, dtype=torch.long))  # right-padded prefill, one pass
        last = torch.stack([p[-1] for p in prompts])[:, None]
        together = model(last, torch.tensor([len(p) - 1 for p in prompts]))[:, -1]
    assert (together - torch.stack(alone)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bsz", [1, 2])
def test_reading_the_whole_cache_equals_reading_the_filled_part(tmp_path, bsz):
    """The static-shape decode step (kv_len = max_seq_len, unfilled positions masked) gives
    the logits of the exact-length step, for one row as for several."""
    state = random_state_dict(TINY_PARAMS, seed=7)
    model = our_model(tmp_path, TINY_PARAMS, state, max_seq_len=32, max_batch_size=2)
    tokens = torch.randint(0, 1000, (bsz, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens[:, :5], 0)
        exact = model(tokens[:, 5:], 5)
        model(tokens[:, :5], 0)
        static = model(tokens[:, 5:], torch.full((bsz,), 5), kv_len=32)
    assert (static - exact).abs().max().item() <= 1e-5


def test_fused_projections_give_the_same_logits(tmp_path):
    """fuse_projections (one wqkv and one w13 matmul per layer) against the three and two separate
    projections of Meta's layout: prefill and cached decode steps, grouped-query attention."""
    params = CONFIGS["gqa-scaled-rope"]
    state = random_state_dict(params, seed=4)
    separate = our_model(tmp_path, params, state, max_seq_len=64)
    fused = our_model(tmp_path, params, state, max_seq_len=64).fuse_projections()
    assert fused.layers[0].attention.wq is None and fused.layers[0].feed_forward.w13 is not None
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in separate.parameters())
    tokens = torch.randint(0, params["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start, chunk in ((0, tokens[:, :10]), (10, tokens[:, 10:11]), (11, tokens[:, 11:])):
            max_diff = (fused(chunk, start) - separate(chunk, start)).abs().max().item()
            assert max_diff <= 1e-5, f"max |Δlogits| from position {start} = {max_diff:.2e}"

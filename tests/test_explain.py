"""`llama.explain`: the explained loop draws the same tokens as `generate`, prints real shapes, leaves no hooks."""

import io
import re

import pytest
import torch

from llama import Llama
from llama.cli import main
from llama.explain import explain, record_shapes

from tests.conftest import TINY_PARAMS, random_state_dict, write_checkpoint

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=64, max_batch_size=1, device="cpu")


def generated(llama, prompt=PROMPT, **kwargs):
    tokens, _ = llama.generate([llama.tokenizer.encode(prompt, bos=True, eos=False)], **kwargs)
    return tokens[0]


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_greedy_tokens_equal_generate(tiny):
    out = io.StringIO()
    tokens = explain(tiny, PROMPT, temperature=0, max_gen_len=6, out=out)
    assert tokens == generated(tiny, max_gen_len=6, temperature=0)
    assert out.getvalue().count("greedy: argmax of the logits") == 6


def test_sampled_tokens_equal_generate_with_the_same_seed(tiny):
    out = io.StringIO()
    tokens = explain(tiny, PROMPT, temperature=1.2, top_p=0.95, max_gen_len=6, seed=3, out=out)
    assert tokens == generated(tiny, max_gen_len=6, temperature=1.2, top_p=0.95, seed=3)
    assert "the nucleus keeps the" in out.getvalue()
    # The build's generator carries on from call to call, in explain as in generate.
    fresh = [Llama(tiny.model, tiny.tokenizer, seed=11) for _ in range(2)]
    assert [explain(fresh[0], PROMPT, temperature=1.0, max_gen_len=4, out=io.StringIO()) for _ in range(2)] == [
        generated(fresh[1], max_gen_len=4, temperature=1.0) for _ in range(2)
    ]


def test_stop_strings_end_it_as_in_generate(tiny):
    full = tiny.tokenizer.decode(generated(tiny, max_gen_len=6, temperature=0))
    stop = full[len(full) // 2 :][:2]
    out = io.StringIO()
    tokens = explain(tiny, PROMPT, temperature=0, max_gen_len=6, stop=[stop], out=out)
    assert tokens == generated(tiny, max_gen_len=6, temperature=0, stop=[stop])
    assert f"holds the stop string {stop!r} -> stop" in out.getvalue()


def test_shapes_are_the_models(tiny):
    out = io.StringIO()
    explain(tiny, PROMPT, temperature=0, max_gen_len=3, out=out)
    text = out.getvalue()
    n = len(tiny.tokenizer.encode(PROMPT, bos=True, eos=False))
    dim, vocab = TINY_PARAMS["dim"], TINY_PARAMS["vocab_size"]
    prefill, decode = text.split("== step 1")[0], text.split("== step 1")[1]
    # Prefill: the whole prompt goes through, logits only for its last position.
    for shape in [f"({1}, {n})", f"(1, {n}, {dim})", f"(1, {vocab})"]:
        assert shape in prefill
    for block in ("layers[0]", "layers[1]"):
        assert re.search(rf"{re.escape(block)} +\(1, {n}, {dim}\)", prefill)
    # Decode steps: one token.
    for shape in ["(1, 1)", f"(1, 1, {dim})", f"(1, 1, {vocab})"]:
        assert shape in decode
    assert f"KV cache   {n}/64 positions filled" in prefill
    assert f"KV cache   {n + 1}/64 positions filled" in decode
    assert text.count("== step") == 3


def test_middle_blocks_are_summarised(tmp_path, llama3_tokenizer_path):
    params = {**TINY_PARAMS, "n_layers": 4}
    ckpt = write_checkpoint(tmp_path / "deep", params, random_state_dict(params, seed=2))
    llama = Llama.build(ckpt, llama3_tokenizer_path, max_seq_len=32, max_batch_size=1, device="cpu")
    out = io.StringIO()
    explain(llama, PROMPT, temperature=0, max_gen_len=1, out=out)
    lines = out.getvalue().splitlines()
    blocks = [line.split()[0] for line in lines if line.strip().startswith("layers[")]
    assert blocks == ["layers[0]", "layers[1..2]", "layers[3]"]


def test_hooks_are_removed(tiny):
    assert hooks_left(tiny.model) == []
    explain(tiny, PROMPT, temperature=0, max_gen_len=2, out=io.StringIO())
    assert hooks_left(tiny.model) == []

    class Broken(io.StringIO):
        def write(self, text):
            if "== step 1" in text:
                raise RuntimeError("terminal closed")
            return super().write(text)

    with pytest.raises(RuntimeError):
        explain(tiny, PROMPT, temperature=0, max_gen_len=3, out=Broken())
    assert hooks_left(tiny.model) == []
    # ... and the model still generates as before.
    assert explain(tiny, PROMPT, temperature=0, max_gen_len=3, out=io.StringIO()) == generated(
        tiny, max_gen_len=3, temperature=0
    )


def test_record_shapes_records_every_stage(tiny):
    tokens = tiny.tokenizer.encode(PROMPT, bos=True, eos=False)
    with torch.inference_mode(), record_shapes(tiny.model) as records:
        tiny.model(torch.tensor([tokens]), 0)
    names = [name for name, _, _ in records]
    assert names == ["tokens", "tok_embeddings", "layers[0]", "layers[1]", "norm", "output"]
    assert records[-1][1] == (1, len(tokens), TINY_PARAMS["vocab_size"])
    assert hooks_left(tiny.model) == []


def test_complete_explain_on_the_command_line(tiny_checkpoints, llama3_tokenizer_path, capsys):
    argv = ["complete", "--explain", "--ckpt-dir", str(tiny_checkpoints["gqa"]), "--tokenizer",
            str(llama3_tokenizer_path), "--max-seq-len", "64", "--temperature", "0", PROMPT]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prompt    {PROMPT!r}")
    assert out.count("== step") == 8  # --max-gen-len defaults to 8 with --explain
    assert "completion" in out.splitlines()[-1]

"""The options every entry point shares (`llama.options`): one parser group, the threads default, escapes."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama.options
from llama.cli import build_parser
from llama.options import add_model_options, physical_cores, unescape

ROOT = Path(__file__).resolve().parent.parent
SHARED = ["--threads", "3", "--compile", "--device", "cpu", "--dtype", "bfloat16", "--quantize", "int8",
          "--max-batch-size", "5", "--max-seq-len", "99", "--speculative", "prompt-lookup", "--speculative-tokens", "6"]


# --- Escapes as typed on a command line ------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("\\n", "\n"),
        ("a\\tb\\r\\n", "a\tb\r\n"),
        ("é\\n", "é\n"),  # UTF-8 text stays itself (unicode_escape would give 'Ã©')
        ("日本\\t語", "日本\t語"),
        ("\\\\n", "\\n"),  # an escaped backslash, then a plain n
        ("C:\\dir\\", "C:\\dir\\"),  # other backslashes stay as typed
        ("plain", "plain"),
    ],
)
def test_unescape(typed, meant):
    assert unescape(typed) == meant


# --- The threads default: one per physical core ----------------------------------------------------


def test_physical_cores_is_between_one_and_the_logical_cpus():
    assert 1 <= physical_cores() <= os.cpu_count()


def fake_topology(root: Path, cores: dict) -> None:
    """A sysfs CPU tree: {cpu: (package, core)}."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_hyperthreads_of_one_core_count_once(monkeypatch, tmp_path):
    fake_topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0), 5: (1, 0)})
    monkeypatch.setattr(llama.options, "SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert physical_cores() == 3  # core 0 of package 1 is not core 0 of package 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 4})  # the CPUs this process may use
    assert physical_cores() == 2


def test_unknown_topology_falls_back_to_the_logical_cpus(monkeypatch, tmp_path):
    monkeypatch.setattr(llama.options, "SYSFS_CPUS", tmp_path)  # empty: no topology files
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert physical_cores() == 3


def test_set_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        llama.options.set_threads(3)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        llama.options.set_threads(None)  # torch read $OMP_NUM_THREADS at startup: its choice stands
        assert torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        llama.options.set_threads(None)
        assert torch.get_num_threads() == physical_cores()
    finally:
        torch.set_num_threads(before)


# --- Every command takes the same model options, from the same function -----------------------------


def serve_parse_args(argv):
    pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e '.[serve]')")
    from llama.serve import parse_args

    return parse_args(argv)


@pytest.mark.parametrize(
    "parse",
    [
        lambda argv: build_parser().parse_args(["chat", *argv]),
        lambda argv: build_parser().parse_args(["complete", *argv, "a prompt"]),
        serve_parse_args,
    ],
    ids=["chat", "complete", "serve"],
)
def test_every_command_takes_the_model_options(parse):
    args = parse(SHARED)
    assert (args.threads, args.compile, args.device, args.dtype, args.quantize) == (3, True, "cpu", "bfloat16", "int8")
    assert (args.max_batch_size, args.max_seq_len) == (5, 99)


def test_defaults_per_command():
    assert build_parser().parse_args(["chat"]).max_batch_size == 1
    assert serve_parse_args([]).max_batch_size == 8
    for args in (build_parser().parse_args(["chat"]), serve_parse_args([])):
        assert (args.threads, args.compile, args.max_seq_len, args.ckpt_dir) == (None, False, 2048, None)


def test_cli_and_serve_get_the_options_from_one_function(monkeypatch):
    serve_parse_args([])  # skips without fastapi
    import llama.cli
    import llama.serve

    assert llama.cli.add_model_options is llama.serve.add_model_options is add_model_options
    calls = []

    def recording(parser, **defaults):
        calls.append(defaults)
        return add_model_options(parser, **defaults)

    monkeypatch.setattr(llama.cli, "add_model_options", recording)
    monkeypatch.setattr(llama.serve, "add_model_options", recording)
    llama.cli.build_parser()
    llama.serve.parse_args([])
    assert calls == [{"max_batch_size": 1}, {"max_batch_size": 1}, {"max_batch_size": 8}]  # chat, complete, serve


def test_bad_threads_is_a_bad_argument(capsys):
    parser = argparse.ArgumentParser(prog="prog")
    add_model_options(parser, max_batch_size=1)
    with pytest.raises(SystemExit) as exit:
        llama.options.check_model_options(parser, parser.parse_args(["--threads", "0"]))
    assert exit.value.code == 2 and "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_build_llama_passes_every_option(monkeypatch, tmp_path):
    built = {}
    monkeypatch.setattr(llama.options.Llama, "build", lambda *args, **kwargs: built.update(args=args, **kwargs))
    monkeypatch.setattr(llama.options, "set_threads", lambda threads: built.update(threads=threads))
    parser = argparse.ArgumentParser()
    add_model_options(parser, max_batch_size=1)
    llama.options.build_llama(parser.parse_args(["--ckpt-dir", str(tmp_path), *SHARED]), seed=7)
    assert built == dict(args=(tmp_path, tmp_path / "tokenizer.model"), threads=3, max_seq_len=99, max_batch_size=5,
                         seed=7, device="cpu", dtype="bfloat16", quantize="int8", compile=True,
                         speculative="prompt-lookup", draft=None, speculative_tokens=6)


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_take_threads(script, tiny_checkpoints, llama3_tokenizer_path):
    """Meta's positional ckpt_dir and tokenizer_path, then --threads like every other entry point."""
    cmd = [sys.executable, str(ROOT / script), str(tiny_checkpoints["gqa"]), str(llama3_tokenizer_path),
           "--threads", "1", "--max_gen_len", "2", "--max_seq_len", "512"]
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==================================") == 4

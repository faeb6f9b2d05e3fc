"""The `llama` command: chat (its session logic, one process, torchrun), complete, delegation, bad arguments."""

import io
import os
import subprocess
import sys

import pytest
import torch

import llama.cli
from llama import Llama
from llama.cli import ChatSession, build_parser, main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
OPTIONS = ["--temperature", "0", "--max-gen-len", "4", "--max-seq-len", "64"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`main` sets torch's threads for the process, as a command must: give this test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=64, max_batch_size=1, device="cpu")


@pytest.fixture
def model_args(tiny_checkpoints, llama3_tokenizer_path):
    return ["--ckpt-dir", str(tiny_checkpoints["gqa"]), "--tokenizer", str(llama3_tokenizer_path)]


def answer_of(llama, dialog):
    """What chat_completion answers, greedily, in 4 tokens: what `llama chat` with OPTIONS must print."""
    return llama.chat_completion([dialog], temperature=0, max_gen_len=4)[0]["generation"]["content"]


def run(cmd, stdin=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, encoding="utf-8", env=env,
                          timeout=timeout)


# --- ChatSession: what the model sees -------------------------------------------------------------


class FakeModel:
    """A reply function that records every dialog it is given and answers with fixed pieces."""

    def __init__(self, pieces=("Hi", " there"), interrupt_after=None, error=None):
        self.pieces, self.interrupt_after, self.error = pieces, interrupt_after, error
        self.seen, self.closed = [], 0

    def __call__(self, dialog):
        self.seen.append(dialog)
        if self.error:
            raise self.error
        return self._stream()

    def _stream(self):
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.interrupt_after:
                    raise KeyboardInterrupt  # as if Ctrl-C arrived during the forward pass
                yield piece
        finally:
            self.closed += 1


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_messages_build_the_dialog():
    model, out = FakeModel(), io.StringIO()
    session = ChatSession(model, out=out)
    assert session.handle("hello") and session.handle("again")
    assert model.seen == [[user("hello")], [user("hello"), assistant("Hi there"), user("again")]]
    assert out.getvalue() == "Hi there\nHi there\n"


def test_reset_and_system():
    model, out = FakeModel(), io.StringIO()
    session = ChatSession(model, system="Be brief.", out=out)
    session.handle("hello")
    session.handle("/reset")
    assert session.dialog == [{"role": "system", "content": "Be brief."}]  # the system prompt survives a reset
    session.handle("/system Answer in French.")
    session.handle("bonjour")
    assert model.seen[-1] == [{"role": "system", "content": "Answer in French."}, user("bonjour")]
    session.handle("/system")  # removes it
    session.handle("hi")
    assert model.seen[-1] == [user("hi")]
    assert "(new dialog)" in out.getvalue() and "(system prompt set; new dialog)" in out.getvalue()


def test_exit_empty_lines_and_unknown_commands():
    model, out = FakeModel(), io.StringIO()
    session = ChatSession(model, out=out)
    assert session.handle("   ") and session.handle("/nope") and session.handle("/help")
    assert model.seen == [] and session.dialog == []
    assert "unknown command /nope" in out.getvalue() and "/reset" in out.getvalue()
    assert session.handle("/exit") is False


def test_ctrl_c_during_the_forward_pass_keeps_the_partial_answer():
    model, out = FakeModel(pieces=("Once", " upon", " a time"), interrupt_after=2), io.StringIO()
    session = ChatSession(model, out=out)
    assert session.handle("tell me a story")  # the session goes on
    assert session.dialog == [user("tell me a story"), assistant("Once upon")]
    assert out.getvalue() == "Once upon [stopped]\n"
    session.handle("go on")
    assert model.seen[-1][-1] == user("go on") and model.closed == 2


def test_ctrl_c_while_printing_closes_the_stream():
    class InterruptedOut(io.StringIO):
        def write(self, text):
            if text == " a time":
                raise KeyboardInterrupt
            return super().write(text)

    model = FakeModel(pieces=("Once", " upon", " a time", " there"))
    session = ChatSession(model, out=InterruptedOut())
    session.handle("story")
    assert session.dialog[-1] == assistant("Once upon a time")  # the piece was received, its printing cut short
    assert model.closed == 1  # the generator was closed at once, not left to the garbage collector


def test_ctrl_c_propagates_when_not_interruptible():
    session = ChatSession(FakeModel(interrupt_after=1), out=io.StringIO(), interruptible=False)
    with pytest.raises(KeyboardInterrupt):
        session.handle("hello")


def test_an_error_drops_the_message():
    out = io.StringIO()
    session = ChatSession(FakeModel(error=ValueError("prompt 0 has 70 tokens, more than max_seq_len=64")), out=out)
    assert session.handle("hello")
    assert session.dialog == []
    assert "max_seq_len=64" in out.getvalue() and "/reset" in out.getvalue()


def test_interrupted_answer_then_real_model_goes_on(tiny):
    """After Ctrl-C mid-answer, the model answers the next message as if the dialog had been given at once."""

    class InterruptAfterFirstPiece(io.StringIO):
        def write(self, text):
            super().write(text)
            if self.getvalue() == text:  # Ctrl-C as the first piece is printed
                raise KeyboardInterrupt

    def reply(dialog):
        return tiny.stream(dialog, temperature=0, max_gen_len=4)

    session = ChatSession(reply, out=InterruptAfterFirstPiece())
    session.handle("hello")
    partial = session.dialog[-1]["content"]
    assert partial and len(partial) < len(answer_of(tiny, [user("hello")]))

    session.out = io.StringIO()
    session.handle("again")
    expected = answer_of(tiny, [user("hello"), assistant(partial), user("again")])
    assert session.out.getvalue() == expected + "\n"


# --- llama chat in a terminal: piped stdin, one process and torchrun -------------------------------


def expected_transcript(tiny):
    """Rank 0's stdout for the input 'hello, /reset, hi' then /exit or the end of input, after the banner line."""
    return f"> {answer_of(tiny, [user('hello')])}\n> (new dialog)\n> {answer_of(tiny, [user('hi')])}\n> \n"


def test_chat_in_one_process(tiny, model_args):
    """Ends at the end of input, as at /exit."""
    result = run([sys.executable, "-m", "llama.cli", "chat", *model_args, *OPTIONS], stdin="hello\n/reset\nhi\n")
    assert result.returncode == 0, result.stderr
    banner, transcript = result.stdout.split("\n", 1)
    assert banner.startswith("llama chat: /reset")
    assert transcript == expected_transcript(tiny)


def test_chat_under_torchrun_two_shards(tiny, tiny_checkpoints, llama3_tokenizer_path):
    """Rank 0 reads stdin and broadcasts each line; both ranks generate in lockstep; only rank 0 prints."""
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "llama.cli", "chat",
           "--ckpt-dir", str(tiny_checkpoints["gqa-2shards"]), "--tokenizer", str(llama3_tokenizer_path), *OPTIONS]
    result = run(cmd, stdin="hello\n/reset\nhi\n/exit\n", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    banner, transcript = result.stdout.split("\n", 1)
    assert banner.startswith("llama chat on 2 ranks:")
    assert transcript == expected_transcript(tiny)  # the 2-shard model answers as the unsharded one


# --- llama complete --------------------------------------------------------------------------------


def test_complete_greedy_equals_text_completion(tiny, model_args, capsys):
    assert main(["complete", *model_args, *OPTIONS, "--max-gen-len", "6", "Hello world"]) == 0
    expected = tiny.text_completion(["Hello world"], temperature=0, max_gen_len=6)[0]["generation"]
    assert capsys.readouterr().out == expected + "\n"


def test_complete_sampled_with_seed_equals_text_completion(tiny, model_args, capsys):
    options = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7", "--max-gen-len", "6", "--max-seq-len", "64"]
    assert main(["complete", *model_args, *options, "Hello world"]) == 0
    expected = tiny.text_completion(["Hello world"], temperature=0.9, top_p=0.95, max_gen_len=6, seed=7)
    assert capsys.readouterr().out == expected[0]["generation"] + "\n"


def test_complete_with_stop_strings(tiny, model_args, capsys):
    full = tiny.text_completion(["Hello world"], temperature=0, max_gen_len=6)[0]["generation"]
    stop = full[len(full) // 2 :][:2]
    assert main(["complete", *model_args, *OPTIONS, "--max-gen-len", "6", "--stop", stop, "--stop", "\x00",
                 "Hello world"]) == 0
    expected = tiny.text_completion(["Hello world"], temperature=0, max_gen_len=6, stop=[stop])[0]["generation"]
    assert capsys.readouterr().out == expected + "\n"
    assert len(expected) < len(full)


def test_complete_stop_takes_escapes_as_typed(tiny, model_args, capsys):
    """`--stop "\\n"`, as the README types it, reaches the program as a backslash and an n: a newline."""
    prompt = "1\n2\n3\n"
    full = tiny.text_completion([prompt], temperature=0, max_gen_len=24)[0]["generation"]
    assert "\n" in full  # the tiny model's greedy continuation of this prompt has a newline
    assert main(["complete", *model_args, *OPTIONS, "--max-gen-len", "24", "--stop", "\\n", prompt]) == 0
    assert capsys.readouterr().out == full[: full.index("\n")] + "\n"


def test_chat_system_takes_escapes_as_typed():
    assert build_parser().parse_args(["chat", "--system", "Be brief.\\nNo lists."]).system == "Be brief.\nNo lists."


def test_complete_takes_the_shared_model_options(model_args, capsys):
    """The model options shared with `llama serve` (tests/test_options.py) work here too."""
    assert main(["complete", *model_args, *OPTIONS, "--max-gen-len", "1", "--threads", "1", "--dtype", "bfloat16",
                 "Hello"]) == 0
    assert torch.get_num_threads() == 1
    assert capsys.readouterr().out.endswith("\n")


# --- llama convert / llama bench: delegated ---------------------------------------------------------


def test_convert_passes_its_arguments_through(monkeypatch):
    import llama.convert.__main__ as convert_cli

    received = []
    monkeypatch.setattr(convert_cli, "main", lambda argv: received.append(argv) or 0)
    assert main(["convert", "--reshard", "src", "dst", "--model-parallel", "2"]) == 0
    assert received == [["--reshard", "src", "dst", "--model-parallel", "2"]]


def test_convert_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["convert", "--help"])
    assert exit.value.code == 0 and "--reshard" in capsys.readouterr().out


def test_bench_runs_the_checkouts_harness(monkeypatch, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "bench.py").write_text(
        "import sys\nRECEIVED = []\ndef main(argv=None):\n    RECEIVED.append((argv, sys.argv[0]))\n    return 0\n"
    )
    monkeypatch.setattr(llama.cli, "_bench_roots", lambda: [tmp_path])
    for name in ("bench", "bench.bench"):
        monkeypatch.setitem(sys.modules, name, None)  # removed (or restored) again after the test
    assert main(["bench", "--quick", "--peers", "none"]) == 0
    assert sys.modules["bench.bench"].RECEIVED == [(["--quick", "--peers", "none"], "llama bench")]


def test_bench_without_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llama.cli, "_bench_roots", lambda: [tmp_path])
    assert main(["bench", "--quick"]) == 1
    assert "ships with the source checkout" in capsys.readouterr().err


# --- Bad arguments: a clear message and exit status 2 ----------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["complete"], "required: prompt"),
        (["complete", "--top-p", "1.5", "x"], "--top-p must be in (0, 1], got 1.5"),
        (["complete", "--temperature", "-1", "x"], "--temperature must be >= 0"),
        (["chat", "--temperature", "hot"], "invalid float value: 'hot'"),
        (["complete", "--max-gen-len", "0", "x"], "--max-gen-len must be >= 1"),
        (["chat", "--max-seq-len", "0"], "--max-seq-len must be >= 1"),
        (["chat", "--ckpt-dir", "/no/such/dir"], "--ckpt-dir /no/such/dir is not a directory"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: llama" in err


def test_a_checkpoint_that_does_not_fit_is_a_bad_argument(tiny_checkpoints, llama3_tokenizer_path, capsys):
    with pytest.raises(SystemExit) as exit:  # 2 shards, 1 process
        main(["complete", "--ckpt-dir", str(tiny_checkpoints["gqa-2shards"]), "--tokenizer",
              str(llama3_tokenizer_path), "x"])
    assert exit.value.code == 2
    assert "llama complete: error:" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_a_bad_argument(model_args, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["complete", *model_args, "--max-seq-len", "4", "one two three four five six seven"])
    assert exit.value.code == 2
    assert "max_seq_len=4" in capsys.readouterr().err


def test_exit_status_2_from_the_command_line():
    result = run([sys.executable, "-m", "llama.cli", "complete", "--top-p", "2", "x"])
    assert result.returncode == 2
    assert "llama complete: error: --top-p must be in (0, 1], got 2.0" in result.stderr

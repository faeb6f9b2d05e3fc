"""The `llama` command: chat, complete, convert, bench.

    llama chat                                   # talk to the bundled SmolLM2-135M-Instruct
    llama complete "The capital of France is"    # stream one completion
    llama complete --explain "The capital of France is"   # ... and show every decoding step
    llama convert SRC DST [--model-parallel N]   # = python -m llama.convert
    llama bench [--quick ...]                    # = python -m bench.bench (source checkout)
    torchrun --nproc_per_node 2 -m llama.cli chat --ckpt-dir CKPT   # a 2-shard checkpoint

Under torchrun every rank builds its shard of the model; rank 0 reads the
terminal and broadcasts each line to the other ranks, every rank runs the same
generation in lockstep, and only rank 0 prints.
"""

import argparse
import importlib.util
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NoReturn, Optional, TextIO

import torch.distributed as dist

from llama.chat_format import Message
from llama.distributed import is_main_process
from llama.options import add_model_options, build_llama, check_model_options, unescape


COMMANDS = "/reset (new dialog), /system TEXT (new system prompt and dialog), /help, /exit"


class ChatSession:
    """The state of a chat in the terminal: the dialog so far and what each typed line does to it.

    A line is a command or a user message:
        /reset          clears the dialog (the system prompt stays)
        /system TEXT    sets the system prompt and clears the dialog; `/system` alone removes it
        /exit           ends the session (so does end of input)
        /help           lists the commands
        anything else   is sent as a user message; the answer is streamed to `out` and added to the dialog

    Ctrl-C (KeyboardInterrupt) during an answer stops that answer and keeps what
    was generated so far in the dialog, as the assistant's message: the model
    remembers what the user saw. With `interruptible=False` it propagates instead
    (under torchrun, where all ranks must stop at the same token).

    Args:
        reply: the dialog -> an iterator of answer pieces (e.g. `Llama.stream` with the chat's options).
        system: the system prompt, or None.
        out: where answers and command feedback are written.
        interruptible: catch KeyboardInterrupt during an answer.
    """

    def __init__(
        self,
        reply: Callable[[List[Message]], Iterable[str]],
        system: Optional[str] = None,
        out: Optional[TextIO] = None,
        interruptible: bool = True,
    ):
        self.reply = reply
        self.system = system
        self.out = sys.stdout if out is None else out
        self.interruptible = interruptible
        self.dialog: List[Message] = []
        self.reset()

    def reset(self) -> None:
        """Starts a new dialog: only the system prompt, if there is one."""
        self.dialog = [{"role": "system", "content": self.system}] if self.system else []

    def handle(self, line: str) -> bool:
        """Acts on one line typed by the user. Returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        command, _, argument = line.partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.reset()
            self._say("(new dialog)")
        elif command == "/system":
            self.system = argument.strip() or None
            self.reset()
            self._say("(system prompt set; new dialog)" if self.system else "(system prompt removed; new dialog)")
        elif command == "/help":
            self._say(f"commands: {COMMANDS}")
        elif command.startswith("/") and command.count("/") == 1:
            self._say(f"(unknown command {command}; /help lists them)")
        else:
            self.answer(line)
        return True

    def answer(self, text: str) -> None:
        """Adds `text` as a user message, streams the reply to `out` and adds it to the dialog."""
        self.dialog.append({"role": "user", "content": text})
        answer: List[str] = []
        pieces = None
        try:
            pieces = iter(self.reply(list(self.dialog)))  # a copy: the model must not see later changes
            for piece in pieces:
                answer.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            if not self.interruptible:
                raise
            self.out.write(" [stopped]")
        except ValueError as e:  # e.g. the dialog no longer fits in max_seq_len
            self.dialog.pop()
            self._say(f"{chr(10) if answer else ''}(error: {e}; /reset starts a new dialog)")
            return
        finally:
            if hasattr(pieces, "close"):  # a generator stopped mid-way: let it clean up now
                pieces.close()
        self.out.write("\n")
        self.out.flush()
        self.dialog.append({"role": "assistant", "content": "".join(answer)})

    def _say(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()


# --- Arguments -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of `llama` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="llama",
        description="Llama inference from scratch: chat, complete text, convert checkpoints, benchmark.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_options(sub: argparse.ArgumentParser, max_gen_len_help: str) -> None:
        """The model options (shared with `llama serve`) and the generation options."""
        add_model_options(sub, max_batch_size=1)
        generation = sub.add_argument_group("generation")
        generation.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
        generation.add_argument("--top-p", type=float, default=0.9,
                                help="nucleus sampling mass, in (0, 1] (default 0.9)")
        generation.add_argument("--max-gen-len", type=int, help=max_gen_len_help)
        generation.add_argument("--seed", type=int, default=1, help="seed of the sampling generator (default 1)")

    chat = commands.add_parser("chat", help="interactive multi-turn chat, answers streamed",
                               description=f"Chat in the terminal, answers streamed as they are generated. "
                               f"Commands: {COMMANDS}. Ctrl-C stops an answer (what was generated stays in "
                               "the dialog); at the prompt it quits, as does end of input.")
    add_options(chat, "most tokens per answer (default: until a stop token or the context is full)")
    chat.add_argument("--system", type=unescape, help="system prompt (\\n, \\t and \\\\ are decoded)")
    chat.set_defaults(run=run_chat, parser=chat)

    complete = commands.add_parser("complete", help="stream one completion of a prompt to stdout",
                                   description="Stream one completion of PROMPT to stdout.")
    complete.add_argument("prompt", help="the text to continue")
    add_options(complete, "most tokens generated (default 128; 8 with --explain)")
    complete.add_argument("--stop", action="append", default=[], metavar="TEXT", type=unescape,
                          help='stop before this text (repeatable; \\n, \\t and \\\\ are decoded: --stop "\\n")')
    complete.add_argument("--explain", action="store_true",
                          help="print every decoding step: shapes, top-5 candidates, the choice, the KV cache")
    complete.set_defaults(run=run_complete, parser=complete)

    # Delegated: everything after the command name goes to their own parsers (see main).
    commands.add_parser("convert", add_help=False, help="convert or reshard checkpoints (python -m llama.convert)")
    commands.add_parser("bench", add_help=False, help="benchmarks (python -m bench.bench; source checkout)")
    commands.add_parser("serve", add_help=False, help="OpenAI-compatible HTTP server (python -m llama.serve)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with status 2 and a usage message if an option is out of range."""
    check_model_options(parser, args)
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_gen_len is not None and args.max_gen_len < 1:
        parser.error(f"--max-gen-len must be >= 1, got {args.max_gen_len}")


def build_llama_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`build_llama` from the options; a bad checkpoint is reported like a bad argument (status 2)."""
    try:
        return build_llama(args, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(parser, str(e))


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """parser.error on rank 0 only (every rank exits with status 2)."""
    if _is_rank0():
        parser.error(message)
    sys.exit(2)


def _is_rank0() -> bool:
    """Rank 0 prints; before the process group exists, torchrun's RANK says which rank this is."""
    return is_main_process() if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


# --- Commands ------------------------------------------------------------------------------------


def run_chat(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`llama chat`: the terminal loop around a `ChatSession`."""
    llama = build_llama_or_exit(parser, args)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    main = _is_rank0()
    out = sys.stdout if main else open(os.devnull, "w")
    # Rank 0 may wait at the prompt far longer than a collective's default timeout (30 minutes):
    # the typed lines travel on a CPU group of their own that waits for days.
    lines_group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if distributed else None

    def reply(dialog):
        return llama.stream(dialog, temperature=args.temperature, top_p=args.top_p, max_gen_len=args.max_gen_len)

    # Under torchrun, Ctrl-C reaches torchrun too, which stops every rank: the session ends.
    session = ChatSession(reply, system=args.system, out=out, interruptible=not distributed)
    if main and distributed:
        print(f"llama chat on {dist.get_world_size()} ranks: {COMMANDS}. Ctrl-C stops torchrun and the session.")
    elif main:
        print(f"llama chat: {COMMANDS}. Ctrl-C stops an answer; at the prompt it quits.")
    while True:
        line = read_line("> ", lines_group) if distributed else _input("> ")
        if line is None or not session.handle(line):
            break
    if main:
        print(flush=True)
    return 0


def _input(prompt: str) -> Optional[str]:
    """One line from the terminal; None at end of input or Ctrl-C."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        return None


def read_line(prompt: str, group=None) -> Optional[str]:
    """Rank 0 reads a line from the terminal and every rank returns it (None: quit)."""
    box = [_input(prompt) if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def run_complete(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`llama complete`: stream one completion, or explain every step of it."""
    llama = build_llama_or_exit(parser, args)
    out = sys.stdout if _is_rank0() else open(os.devnull, "w")
    options = dict(temperature=args.temperature, top_p=args.top_p, stop=args.stop)
    try:
        if args.explain:
            from llama.explain import explain

            explain(llama, args.prompt, max_gen_len=args.max_gen_len or 8, seed=args.seed, out=out, **options)
            return 0
        for piece in llama.stream(args.prompt, max_gen_len=args.max_gen_len or 128, **options):
            out.write(piece)
            out.flush()
    except ValueError as e:  # e.g. a prompt longer than --max-seq-len
        _fail(parser, str(e))
    out.write("\n")
    out.flush()
    return 0


def run_convert(argv: List[str]) -> int:
    """`llama convert ...`: python -m llama.convert with the same arguments."""
    from llama.convert.__main__ import main as convert_main

    return convert_main(argv) or 0


def run_bench(argv: List[str]) -> int:
    """`llama bench ...`: python -m bench.bench with the same arguments (a source checkout only)."""
    bench_main = _load_bench()
    if bench_main is None:
        print("llama bench: the benchmark harness ships with the source checkout (bench/bench.py), "
              "not with the installed package: clone the repository and run `llama bench` from its root",
              file=sys.stderr)
        return 1
    program, sys.argv = sys.argv, ["llama bench", *argv]  # the harness's usage and report name the command
    try:
        return bench_main(argv) or 0
    finally:
        sys.argv = program


def run_serve(argv: List[str]) -> int:
    """`llama serve ...`: python -m llama.serve with the same arguments (needs the `serve` extra)."""
    try:
        from llama.serve import main as serve_main
    except ImportError as e:
        print(f"llama serve: {e}; install the server's dependencies with: pip install -e '.[serve]'", file=sys.stderr)
        return 1
    return serve_main(argv, prog="llama serve") or 0


def _bench_roots() -> List[Path]:
    """Where bench/bench.py is looked for: the checkout this package lives in, then the current directory."""
    return [Path(__file__).resolve().parent.parent, Path.cwd()]


def _load_bench() -> Optional[Callable[[List[str]], Optional[int]]]:
    """main() of bench/bench.py, loaded from its folder (None if there is none).

    From the folder rather than by `import bench.bench`: the checkout is on sys.path
    only when the command runs from its root. The package goes in first (bench.py's
    own `from bench.meters import ...` find the other modules through it), then bench.py.
    """
    for root in _bench_roots():
        folder = root / "bench"
        if (folder / "bench.py").is_file():
            package = importlib.util.spec_from_file_location("bench", folder / "__init__.py",
                                                             submodule_search_locations=[str(folder)])
            harness = importlib.util.spec_from_file_location("bench.bench", folder / "bench.py")
            for spec in (package, harness):
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # imports and dataclasses look modules up there
                spec.loader.exec_module(module)
            return module.main
    return None


DELEGATED: Dict[str, Callable[[List[str]], int]] = {"convert": run_convert, "bench": run_bench, "serve": run_serve}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `llama` command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:  # their own parsers take the rest, --help included
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    check_args(args.parser, args)  # errors read "llama complete: error: ..."
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING, format="%(message)s")
    try:
        return args.run(args.parser, args)
    except KeyboardInterrupt:  # outside an answer (loading, or under torchrun): quit without a traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())

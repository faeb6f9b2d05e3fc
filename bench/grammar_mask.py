"""Grammar engines' per-token cost on our tokenizers, and the bundled model's tokens/s with and
without a JSON schema: the measurements behind choosing llguidance (`llama.grammar`).

    python -m bench.grammar_mask                        # every engine, batch 1 and 8, then tokens/s
    python -m bench.grammar_mask --engines llguidance --no-generate
    python -m bench.grammar_mask --no-masks --requests 20          # tokens/s only

Each engine (llguidance, xgrammar, outlines-core; those installed) compiles a JSON schema with
a nested object, an enum, an array and required fields, for each tokenizer (the bundled
SmolLM2's, 49,152 tokens; Meta's Llama 3, 128,256), and B rows each follow a valid document
token by token (the documents as `json.dumps` writes them, which every engine's JSON accepts).
Per step it times, in milliseconds:
    fill     the engine's masks of the B rows (its batched call where it has one), as bit masks
    apply    the bit masks applied to (B, V) logits: the same code for every engine, ours
             (`llama.grammar.unpack_bitmask`, then `llama.processors.add_grammar_mask`)
    accept   each row's matcher taking its token
and once per request the schema's compilation (after the vocabulary's setup). An engine that has not compiled the schema
for a tokenizer within --compile-timeout seconds is reported as such and skipped.

Then the bundled model generates at batch 1, on this machine's threads (`--threads`):
chat replies sampled at temperature 1, alternately free and under the schema, and the
tokens/s of each (tokens / time of the decode steps, the prefill left out) and the grammar's
cost per token (the difference of the seconds per token) are printed.
"""

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

from llama.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}
DOCUMENTS = [
    {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry"],
     "address": {"city": "London", "zip": "12345"}},
    {"name": "Alan Turing", "age": 41, "role": "user", "tags": [], "address": {"city": "Wilmslow", "zip": "98765"}},
    {"name": "Grace Hopper", "age": 85, "role": "guest", "tags": ["navy", "cobol", "compilers"],
     "address": {"city": "Arlington", "zip": "22201"}},
]
ENGINES = ("llguidance", "xgrammar", "outlines-core")

# An engine: made for a tokenizer (its vocabulary's setup, once per process), it compiles the schema for
# B rows (compile), then fills the rows' bit masks (B, W) int32 (fill) and takes a token per row (accept).
Fill, Accept = Callable[[], None], Callable[[List[int]], None]
Engine = Callable[[int, torch.Tensor], Tuple[Fill, Accept]]


def llama3_tokenizer_path() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def special_free_vocabulary(tokenizer) -> List[bytes]:
    """Every token's bytes, b"" for special tokens (which no JSON text holds)."""
    from llama.grammar import token_bytes

    special = set(tokenizer.special_tokens.values())
    return [b"" if i in special else piece for i, piece in enumerate(token_bytes(tokenizer))]


def llguidance_engine(tokenizer) -> Engine:
    from llama.grammar import Grammar, _lltokenizer, fill_bitmask

    _lltokenizer(tokenizer)  # built once per tokenizer

    def compile(rows, bitmask):
        state = Grammar.json_schema(SCHEMA, tokenizer).start(rows)
        return (lambda: fill_bitmask([(state, [True] * rows)], bitmask),
                lambda tokens: state.advance(tokens, [True] * rows))

    return compile


def xgrammar_engine(tokenizer) -> Engine:
    import xgrammar

    info = xgrammar.TokenizerInfo(special_free_vocabulary(tokenizer), xgrammar.VocabType.RAW,
                                  vocab_size=tokenizer.n_words, stop_token_ids=list(tokenizer.stop_tokens))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # every request compiles its schema
    batch = xgrammar.BatchGrammarMatcher()

    def compile(rows, bitmask):
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]

        def accept(tokens):
            for matcher, token in zip(matchers, tokens):
                assert matcher.accept_token(token)

        return lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask), accept

    return compile


def outlines_engine(tokenizer) -> Engine:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    tokens = {}
    for i, piece in enumerate(special_free_vocabulary(tokenizer)):
        if piece and i not in tokenizer.stop_tokens:
            tokens.setdefault(piece, []).append(i)
    vocabulary = outlines_core.Vocabulary(tokenizer.stop_tokens[0], tokens)

    def compile(rows, bitmask):
        index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)  # shared by the rows
        guides = [outlines_core.Guide(index) for _ in range(rows)]

        def fill():
            for row, guide in enumerate(guides):
                words = bitmask[row]
                guide.write_mask_into(words.data_ptr(), words.numel(), words.element_size())

        def accept(tokens):
            for guide, token in zip(guides, tokens):
                guide.advance(token)

        return fill, accept

    return compile


ENGINE_SETUP = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def measure(engine: str, tokenizer_path: Path, rows: int, results) -> None:
    """Runs in a child process (so that a compilation past the timeout can be stopped): puts its figures."""
    from llama.grammar import unpack_bitmask
    from llama.processors import add_grammar_mask

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.n_words
    bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
    start = time.perf_counter()
    compile = ENGINE_SETUP[engine](tokenizer)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    fill, accept = compile(rows, bitmask)
    compile_ms = (time.perf_counter() - start) * 1e3
    documents = [tokenizer.encode(json.dumps(DOCUMENTS[i % len(DOCUMENTS)]), bos=False, eos=False)
                 for i in range(rows)]
    logits = torch.randn(rows, vocab)
    times = {"fill": [], "apply": [], "accept": []}
    for step in range(min(map(len, documents))):
        tokens = [document[step] for document in documents]
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        masked = add_grammar_mask(logits, unpack_bitmask(bitmask, vocab, "cpu"))
        t2 = time.perf_counter()
        assert all(masked[i, t] > -float("inf") for i, t in enumerate(tokens)), f"{engine} refused a valid token"
        t3 = time.perf_counter()
        accept(tokens)
        t4 = time.perf_counter()
        for name, seconds in (("fill", t1 - t0), ("apply", t2 - t1), ("accept", t4 - t3)):
            times[name].append(seconds * 1e3)
    results.put({"setup_s": setup_s, "compile_ms": compile_ms, "steps": len(times["fill"]),
                 **{name: statistics.mean(values) for name, values in times.items()}})


def mask_costs(engines: List[str], batches: List[int], timeout: float) -> None:
    tokenizers = {"SmolLM2 (49,152)": bundled_tokenizer_path(), "Llama 3 (128,256)": llama3_tokenizer_path()}
    print(f"{'engine':14s} {'tokenizer':18s} {'B':>2s} {'setup s':>7s} {'compile ms':>10s} {'fill ms':>8s} "
          f"{'apply ms':>8s} {'accept ms':>9s}")
    context = multiprocessing.get_context("spawn")
    for engine in engines:
        for name, path in tokenizers.items():
            for rows in batches:
                results = context.Queue()
                child = context.Process(target=measure, args=(engine, path, rows, results))
                child.start()
                child.join(timeout)
                if child.is_alive():
                    child.kill()
                    print(f"{engine:14s} {name:18s} {rows:2d}  did not compile the schema within {timeout:g} s")
                    break  # a larger batch compiles the same
                if child.exitcode != 0:
                    print(f"{engine:14s} {name:18s} {rows:2d}  failed (exit code {child.exitcode})")
                    continue
                r = results.get()
                print(f"{engine:14s} {name:18s} {rows:2d} {r['setup_s']:7.2f} {r['compile_ms']:10.1f} "
                      f"{r['fill']:8.3f} {r['apply']:8.3f} {r['accept']:9.3f}")
    print("(setup: the vocabulary, once per tokenizer; compile: the schema, per request; fill, apply, accept:\n"
          " per step of B rows, the mean over the documents' tokens)")


def bundled_tokenizer_path() -> Path:
    from llama.default_model import ensure_default_model

    return ensure_default_model()[1]


def tokens_per_second(requests: int, max_tokens: int) -> None:
    from llama import Llama
    from llama.default_model import ensure_default_model

    ckpt_dir, tokenizer_path = ensure_default_model()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=512, max_batch_size=1)
    dialog = [{"role": "user", "content": "Describe a made-up person: name, age, role, tags and address."}]
    prompt = llama.formatter.encode_dialog_prompt(dialog)
    llama.chat_completion([dialog], max_gen_len=8, seed=0)  # warm-up
    totals = {"free": [0, 0.0], "json_schema": [0, 0.0]}  # decoded tokens, seconds of decode steps
    documents = 0  # schema generations that ended as a whole document (not cut by max_tokens)
    for seed in range(requests):
        for kind, options in (("free", {}), ("json_schema", {"json_schema": SCHEMA})):
            request = llama.request([prompt], max_tokens, temperature=1.0, top_p=1.0, seed=seed, **options)
            llama.engine.add(request)
            llama.engine.step()  # the prefill (and the first token): not timed
            start = time.perf_counter()
            while not request.finished:
                llama.engine.step()
            totals[kind][1] += time.perf_counter() - start
            seq = request.sequences[0]
            totals[kind][0] += len(seq.tokens) - 1
            if kind == "json_schema" and seq.stop.cause == "stop token":
                json.loads(llama.tokenizer.decode(seq.result))  # ended by itself: a whole document
                documents += 1
    rate = {kind: n / seconds for kind, (n, seconds) in totals.items()}
    print(f"\nSmolLM2-135M-Instruct, eager, batch 1, {torch.get_num_threads()} threads, {requests} requests each "
          f"(alternately), temperature 1, at most {max_tokens} tokens; decode steps only (the prefill is not timed):")
    for kind, (n, seconds) in totals.items():
        print(f"  {kind:12s} {n:5d} tokens in {seconds:6.1f} s: {rate[kind]:6.2f} tokens/s")
    print(f"  ({documents} of the {requests} schema generations ended as a whole document, the rest at max_tokens)")
    overhead = 1e3 / rate["json_schema"] - 1e3 / rate["free"]
    print(f"  the schema costs {overhead:+.2f} ms per token ({rate['json_schema'] / rate['free'] - 1:+.1%} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grammar_mask", description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="seconds an engine may take to compile the schema for one tokenizer (default: 120)")
    parser.add_argument("--requests", type=int, default=8, help="generations of each kind (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens per generation (default: 128)")
    parser.add_argument("--threads", type=int, help="torch threads for the generations (default: torch's)")
    parser.add_argument("--no-generate", action="store_true", help="measure the masks only")
    parser.add_argument("--no-masks", action="store_true", help="measure the tokens/s only")
    args = parser.parse_args()
    if not args.no_masks:
        mask_costs(args.engines, args.batch, args.compile_timeout)
    if not args.no_generate:
        if args.threads:
            torch.set_num_threads(args.threads)
        tokens_per_second(args.requests, args.max_tokens)


if __name__ == "__main__":
    main()

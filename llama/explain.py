"""A view into the decoding loop, step by step, for teaching (`llama complete --explain`).

`explain` drives the library's one decoding engine (`Llama.engine`: prefill, then
one decode step per token) as `Llama.stream` does, and only observes it:

- forward hooks on the model's stages record the tensor shapes of each pass
  (tokens -> embeddings -> every block -> final norm -> logits); they are
  removed when the run ends, and model.py knows nothing of them;
- the engine's observer hook (`Engine.observe`) hands over the logits the
  sampler chose from; the probabilities, the top-p nucleus and the greedy choice
  are recomputed from them with `llama.processors`' own functions, without
  drawing from the random generator: the token printed as chosen is the one the
  engine drew;
- the stop check printed is the sequence's own `StopCriteria` verdict.

So an explained run yields exactly the tokens of `generate` / `stream` with the
same seed and sampling controls.
"""

import contextlib
import sys
from typing import Iterator, List, Optional, Sequence, TextIO, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.generation import Llama
from llama.model import Transformer
from llama.processors import apply_processors, min_p_mask, temperature_scale, top_k, top_p_mask

TOP = 5  # candidates shown per step
MAX_PROMPT_ROWS = 16  # prompt tokens listed one per line; longer prompts are summarised

# One forward stage seen by a hook: (name, shape, dtype).
Record = Tuple[str, Tuple[int, ...], torch.dtype]
SUMMARY = ("tokens", "tok_embeddings", "output")  # the stages a repeated step's one-line summary shows


@contextlib.contextmanager
def record_shapes(model: Transformer) -> Iterator[List[Record]]:
    """Records the output shape of each stage of `model`'s forward passes while the block runs.

    Yields a list that every forward pass appends to, in order: ("tokens", ...),
    ("tok_embeddings", ...), ("layers[i]", ...) for each block, ("norm", ...) and
    ("output", ...) (the logits). Clear it between passes. The hooks are removed
    on exit, also when the block raises.
    """
    records: List[Record] = []

    def on_input(name):
        def hook(module, inputs):
            records.append((name, tuple(inputs[0].shape), inputs[0].dtype))

        return hook

    def on_output(name):
        def hook(module, inputs, output):
            records.append((name, tuple(output.shape), output.dtype))

        return hook

    handles = [
        model.tok_embeddings.register_forward_pre_hook(on_input("tokens")),
        model.tok_embeddings.register_forward_hook(on_output("tok_embeddings")),
        *(layer.register_forward_hook(on_output(f"layers[{i}]")) for i, layer in enumerate(model.layers)),
        model.norm.register_forward_hook(on_output("norm")),
        model.output.register_forward_hook(on_output("output")),
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def explain(
    llama: Llama,
    prompt: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 8,
    *,
    stop: Sequence[str] = (),
    seed: Optional[int] = None,
    out: Optional[TextIO] = None,
    **options,
) -> List[int]:
    """Generates one completion like `Llama.stream`, printing what happens at every decoding step.

    For each step it prints the tensor shapes through the model (prefill: (1, L, ...);
    decode steps: (1, 1, ...)), the top candidates with their probabilities after the
    temperature, which token was chosen and why (greedy argmax, or the nucleus that
    top-p kept and the drawn token's probability), the stop check, and how full the
    KV cache is.

    Args:
        llama: a built `Llama`.
        prompt: the text to continue.
        temperature, top_p, max_gen_len: as in `Llama.stream` (max_gen_len defaults to 8 here).
        stop: stop strings, as in `Llama.stream`.
        seed: seeds a fresh generator for this call (default: the one seeded in `build`).
        out: where to print (default: sys.stdout).
        **options: `generate`'s other keyword-only sampling controls (top_k, min_p, ...).

    Returns:
        The generated token ids, as `generate` returns them: cut before a stop
        token, ending with the token that completes a stop string.
    """
    out = sys.stdout if out is None else out
    model, tokenizer, engine = llama.model, llama.tokenizer, llama.engine
    prompt_tokens = tokenizer.encode(prompt, bos=True, eos=False)
    request = llama.request([prompt_tokens], max_gen_len, temperature, top_p, seed=seed, stop=stop, text=True,
                            **options)
    seq, params = request.sequences[0], request.params
    max_seq_len = model.params.max_seq_len
    cache = engine.cache_layout

    def show(line: str = "") -> None:
        print(line, file=out)

    _show_prompt(show, tokenizer, prompt, prompt_tokens)
    if params.temperature == 0:
        controls = "greedy (temperature 0)"
    else:
        controls = f"temperature {params.temperature}, top-p {params.top_p}"
    draws = "" if params.temperature == 0 else ", the generator of build" if seed is None else f", seed {seed}"
    show(f"sampling  {controls}, max_gen_len {max_gen_len}{draws}")
    shards = fs_init.get_model_parallel_world_size()
    where = f" on this rank (1 of {shards} shards)" if shards > 1 else ""
    show(f"KV cache  {cache.layers} layers x (k, v) x {cache.rows} row(s) x {cache.heads} kv heads x "
         f"{cache.positions} positions x {cache.head_dim} dims ({cache.dtype}): {_bytes(cache.allocated)} "
         f"allocated{where}")

    sampled: List[torch.Tensor] = []  # the logits (1, V) the engine's sampler chose from, this step

    def observer(observed_request, logits, tokens):
        sampled[:] = [logits]

    first_decode: List[Record] = []  # the shapes of step 1, to summarise the later steps that repeat them
    with torch.inference_mode(), record_shapes(model) as records, engine.observe(observer):
        engine.add(request)
        try:
            step = 0
            while not request.finished:
                engine.step()
                token = seq.tokens[-1]
                position = len(prompt_tokens) + step - 1  # where this step's input token sits
                show()
                if step == 0:
                    show(f"== step 0: prefill, {len(prompt_tokens)} prompt tokens at positions 0..{position} ==")
                else:
                    show(f"== step {step}: decode, token {_piece(tokenizer, seq.tokens[-2])} at position {position} ==")
                if step >= 2 and records == first_decode:  # every decode step has the same shapes
                    shapes = " -> ".join(str(shape) for name, shape, _ in records if name in SUMMARY)
                    show(f"  shapes     {shapes}, as in step 1")
                else:
                    _show_shapes(show, records, prefill=step == 0)
                first_decode = list(records) if step == 1 else first_decode
                records.clear()

                # The penalties see what the sampler saw: the prompt and the tokens before this one.
                history = request.generated[:, :-1]  # (1, t)
                _show_choice(show, tokenizer, apply_processors(sampled[0], history, params, request.prompts),
                             params, token)
                _show_stop_check(show, tokenizer, seq, token)
                filled = len(prompt_tokens) + step  # positions written so far (the new token is not, yet)
                show(f"  KV cache   {filled}/{max_seq_len} positions filled, "
                     f"{_bytes(filled * cache.bytes_per_position)} of {_bytes(cache.allocated)}")
                step += 1
        finally:
            engine.abort(request)  # the printing failed midway: the engine stays ready
    show()
    show(f"completion {seq.stop.text.shown!r}  ({len(seq.result)} tokens)")
    return seq.result


def _show_prompt(show, tokenizer, prompt: str, prompt_tokens: List[int]) -> None:
    """The tokenization: the prompt, then the position, id and text of each of its tokens."""
    show(f"prompt    {prompt!r}")
    show(f"tokens    {len(prompt_tokens)} ids (tokenizer.encode)")
    shown = prompt_tokens if len(prompt_tokens) <= MAX_PROMPT_ROWS else prompt_tokens[: MAX_PROMPT_ROWS - 2]
    for position, token in enumerate(shown):
        show(f"  {position:>4}  {token:>7}  {_piece(tokenizer, token)}")
    if len(shown) < len(prompt_tokens):
        show(f"  ...   ({len(prompt_tokens) - len(shown)} more)")


def _show_shapes(show, records: List[Record], prefill: bool) -> None:
    """One line per stage of the forward pass; the blocks between the first and the last are summarised."""
    layers = [r for r in records if r[0].startswith("layers[")]
    rows: List[Tuple[str, Tuple[int, ...], torch.dtype, str]] = []
    for name, shape, dtype in records:
        if name.startswith("layers["):
            continue
        note = {
            "tokens": "token ids",
            "tok_embeddings": "one vector per token",
            "norm": "final RMSNorm",
            "output": "logits of the last position only" if prefill else "logits of the new token",
        }[name]
        rows.append((name, shape, dtype, note))
        if name == "tok_embeddings" and layers:
            rows.append((*layers[0], "block 0: attention (+ KV cache write) and feed-forward"))
            middle = layers[1:-1]
            if middle:
                shapes = {r[1] for r in middle}
                shape = middle[0][1] if len(shapes) == 1 else "(various)"
                note = f"{len(middle)} more blocks, same shape"
                rows.append((f"layers[1..{len(middle)}]", shape, middle[0][2], note))
            if len(layers) > 1:
                rows.append((*layers[-1], f"block {len(layers) - 1}, the last"))
    for name, shape, dtype, note in rows:
        show(f"  {name:<16} {str(shape):<16} {str(dtype).removeprefix('torch.'):<8} {note}")


def _show_choice(show, tokenizer, logits: torch.Tensor, params, token: int) -> None:
    """The top candidates after the temperature, and why `token` was the one chosen.

    logits: (1, V) after the penalties (steps 1-4 of `llama.processors`), before the temperature.
    """
    greedy = params.temperature == 0
    if greedy:  # no temperature: show the model's own distribution
        probs = torch.softmax(logits, dim=-1)[0]  # (V,)
        heading = f"top-{TOP} candidates (probabilities at temperature 1; greedy takes the first)"
    else:
        scaled = top_k(temperature_scale(logits, params.temperature), params.top_k)
        probs = torch.softmax(scaled, dim=-1)[0]  # (V,), the distribution sample_top_p receives
        t = params.temperature
        heading = f"top-{TOP} candidates after temperature {t} (softmax of logits / {t})"
        if params.top_k:
            heading += f", top-k {params.top_k}"
    probs_sort, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(probs_sort, dim=0)
    rank = int((order == token).nonzero()[0, 0])

    show(f"  {heading}")
    show(f"    {'rank':>4}  {'id':>7}  {'token':<20} {'logit':>8}  {'prob':>7}  {'cum':>7}")
    rows = list(range(min(TOP, len(order))))
    if rank >= TOP:
        rows.append(rank)
    for r in rows:
        if r == rank and rank >= TOP:
            show("    ...")
        tid = int(order[r])
        mark = "  <- chosen" if r == rank else ""
        show(f"    {r + 1:>4}  {tid:>7}  {_piece(tokenizer, tid):<20} {float(logits[0, tid]):>8.3f}  "
             f"{float(probs_sort[r]):>7.4f}  {float(cumulative[r]):>7.4f}{mark}")

    chosen = _piece(tokenizer, token)
    if greedy:
        show(f"  choice     greedy: argmax of the logits -> {chosen} (p = {float(probs[token]):.4f})")
        return
    # The nucleus as `sample_top_p` builds it: the same masks on the same sorted probabilities.
    dropped = top_p_mask(probs_sort[None], params.top_p)[0]
    if params.min_p > 0:
        dropped |= min_p_mask(probs_sort[None], params.min_p)[0]
    kept, mass = int((~dropped).sum()), float(probs_sort[~dropped].sum())
    show(f"  choice     top-p {params.top_p}: the nucleus keeps the {kept} most likely token{'s' * (kept != 1)}, "
         f"holding {mass:.4f} of the probability")
    show(f"             one draw from them (renormalised) -> {chosen}, rank {rank + 1}, "
         f"p = {float(probs[token]):.4f} ({float(probs[token]) / mass:.4f} within the nucleus)")


def _show_stop_check(show, tokenizer, seq, token: int) -> None:
    """Prints the sequence's stop check (its `StopCriteria`) for the token just sampled."""
    stop, n = seq.stop, len(seq.tokens)
    if stop.cause == "stop token":
        show(f"  stop check {_piece(tokenizer, token)} is a stop token -> stop (it is not part of the completion)")
    elif stop.cause == "stop string":
        found = next(s for s in stop.text.stop if s in stop.text.text)
        show(f"  stop check the text now holds the stop string {found!r} -> stop (the completion ends before it)")
    elif stop.cause == "length":
        show(f"  stop check {n}/{stop.limit} tokens: the length limit -> stop")
    else:
        show(f"  stop check not a stop token; {n}/{stop.limit} tokens -> go on")


def _piece(tokenizer, token: int) -> str:
    """The text of one token, quoted (special tokens spelled out), cut to stay within its column."""
    text = repr(tokenizer.decode([token]))
    return text if len(text) <= 20 else text[:16] + "...'"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

"""Continuous batching: many requests share one model, joining and leaving the
decode batch between steps.

Each running sequence owns one row of the KV cache (a slot) and sits at its own
position, so a newcomer can join while the others are half-way through their
answers, and a finished sequence leaves at once. The model computes rows
0..B-1 of the cache for a batch of B, so the running sequences are kept
*compacted* in rows 0..n-1, in row order:

    admit k newcomers   move the sequences in rows 0..k-1 to free rows at the end,
                        then prefill the k prompts into rows 0..k-1 (one forward pass)
    decode step         every running row feeds its newest token at its own position
    finish / cancel     the sequence leaves; the last rows move into the holes

A move copies only the positions a row has filled ("cache_len"): positions past
a row's own are never read (the attention mask stops at each row's position) and
are overwritten before they are, so stale keys there are harmless.

Everything that touches the model goes through `ModelRunner.run(Step)`: under
`torchrun` rank 0 broadcasts each `Step` and every rank runs it in lockstep on its
shard (`ModelRunner.follow` on the other ranks). Sampling happens on rank 0 only:
the logits are complete on every rank, and the chosen tokens travel in the next
step. The scheduler itself (queue, admission, sampling, stop checks, text) runs
in one background thread; HTTP handlers talk to it through `submit` and each
sequence's `sink` callback.

Shapes: B rows in a step, k prompts admitted, L longest prompt, V vocabulary, D model dim.
"""

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Tuple
from typing import Sequence as SequenceType

import torch
import torch.distributed as dist

from llama.model import Transformer
from llama.processors import SamplingParams, next_token
from llama.streaming import TextStream

logger = logging.getLogger(__name__)

# Under torchrun, a broadcast that waits longer than the process group's timeout
# (30 minutes by default) fails: an idle rank 0 sends an empty step this often.
HEARTBEAT_SECONDS = 60.0


# --- What the scheduler tells a request's owner ----------------------------------------------------


@dataclass
class TokenLogprob:
    """One generated token with its log-probability (of the unprocessed distribution, as in `Llama.generate`)."""

    token: int
    text: str
    logprob: float
    top: List[Tuple[str, float]]  # the most likely tokens at this position, (text, logprob), best first


@dataclass
class Delta:
    """New text of a sequence (may be "" when only logprobs arrive), and the tokens that made it final."""

    text: str
    logprobs: List[TokenLogprob]


@dataclass
class Finished:
    """The last event of a sequence.

    reason: "stop" (a stop token or stop string), "length" (max_tokens or the
    context is full), "timeout", "cancelled" (its owner left) or "error".
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


Event = object  # Delta | Finished


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later."""


# --- One request ----------------------------------------------------------------------------------

_ids = itertools.count()


class Sequence:
    """One request's generation: its inputs, its row of the KV cache, its progress.

    Args:
        prompt_tokens: the prompt's token ids (at least one, fewer than max_seq_len).
        max_new_tokens: most tokens generated; the end of the context stops it earlier.
        params: how each next token is chosen.
        sink: called from the scheduler thread with each `Delta` and the final
            `Finished`; it must not block (e.g. `loop.call_soon_threadsafe(queue.put_nowait, ...)`).
            Set it before `Scheduler.submit`.
        stop: strings that end the text before them.
        seed: seeds this sequence's own generator (None: a random seed).
        logprobs: report each token's log-probability ...
        top_logprobs: ... and this many most likely alternatives.
        timeout: seconds from submission after which it ends with reason "timeout".
    """

    def __init__(
        self,
        prompt_tokens: List[int],
        max_new_tokens: int,
        params: SamplingParams,
        *,
        sink: Optional[Callable[[Event], None]] = None,
        stop: SequenceType[str] = (),
        seed: Optional[int] = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        timeout: Optional[float] = None,
    ):
        self.id = next(_ids)
        self.prompt_tokens = list(prompt_tokens)
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.sink = sink
        self.stop = list(stop)
        self.seed = seed
        self.logprobs = logprobs or top_logprobs > 0
        self.top_logprobs = top_logprobs
        self.deadline = None if timeout is None else time.monotonic() + timeout

        # Set by the scheduler.
        self.row: Optional[int] = None  # its row of the KV cache while running
        self.generated: List[int] = []  # tokens chosen so far (stop tokens excluded)
        self.text: Optional[TextStream] = None
        self.generator: Optional[torch.Generator] = None
        self.prompt: Optional[torch.Tensor] = None  # (1, L) for the processors
        self.unsent: List[TokenLogprob] = []  # logprobs of tokens whose text is still held back
        self.done = False
        self.cancelled = False

    def cancel(self) -> None:
        """Ends the sequence from any thread; its slot is freed before the next decode step."""
        self.cancelled = True

    @property
    def cache_len(self) -> int:
        """Positions of its cache row holding keys: the prompt and every generated token but the newest."""
        return len(self.prompt_tokens) + len(self.generated) - 1

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


# --- The model side: what every rank runs ---------------------------------------------------------


@dataclass
class Step:
    """One step of the scheduler, the same on every rank: cache-row moves, then at most one forward pass."""

    moves: List[Tuple[int, int, int]] = field(default_factory=list)  # (from row, to row, positions), in order
    prompts: Optional[List[List[int]]] = None  # prefill: prompt i into cache row i
    tokens: Optional[List[int]] = None  # decode: row i feeds tokens[i] at positions[i]
    positions: Optional[List[int]] = None
    shutdown: bool = False  # the other ranks leave `follow`


class ModelRunner:
    """Runs `Step`s on the model; under torchrun, rank 0 broadcasts each to the other ranks."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.output.weight.device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def run(self, step: Step) -> Optional[torch.Tensor]:
        """On rank 0: sends the step to the other ranks, runs it, returns its logits (B, V) (None without a pass)."""
        if self.world_size > 1:
            dist.broadcast_object_list([step], src=0)
        return self.execute(step)

    def follow(self) -> None:
        """On ranks > 0: runs rank 0's steps until it shuts down."""
        with torch.inference_mode():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                step = box[0]
                if step.shutdown:
                    logger.info("rank 0 shut down: leaving")
                    return
                self.execute(step)

    def close(self) -> None:
        """On rank 0: releases the other ranks from `follow`."""
        if self.world_size > 1:
            try:
                self.run(Step(shutdown=True))
            except Exception as e:  # a rank already gone (killed): nothing left to release
                logger.warning("could not release the other ranks: %s", e)

    def execute(self, step: Step) -> Optional[torch.Tensor]:
        for src, dst, length in step.moves:
            self.move_row(src, dst, length)
        if step.prompts:
            return self.prefill(step.prompts)
        if step.tokens:
            return self.decode(step.tokens, step.positions)
        return None

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of cache row src into row dst, in every layer."""
        for layer in self.model.layers:
            cache = layer.attention.cache  # k, v: (max_batch_size, Hkv, max_seq_len, hd)
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]

    def prefill(self, prompts: List[List[int]]) -> torch.Tensor:
        """Writes prompt i into cache row i; returns the logits (k, V) at each prompt's last position.

        The same pass as `Llama.generate`'s prefill: right-padded, each row read at its own last token.
        """
        lengths = [len(p) for p in prompts]
        padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)  # (k, L)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        same_length = min(lengths) == max(lengths)
        start = 0 if same_length else torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        hidden = self.model.forward_hidden(padded, start, kv_len=max(lengths))  # (k, L, D)
        last = torch.tensor(lengths, device=self.device) - 1
        last_hidden = hidden[torch.arange(len(prompts), device=self.device), last]  # (k, D)
        return self.model.output(last_hidden).float()  # (k, V)

    def decode(self, tokens: List[int], positions: List[int]) -> torch.Tensor:
        """Row i feeds tokens[i] at positions[i]; returns the logits (B, V) of the next tokens."""
        batch = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        if min(positions) == max(positions):
            # Every row at one position (always so with one row): the library's own decode call, unmasked.
            return self.model(batch, positions[0])[:, -1]
        start = torch.tensor(positions, device=self.device)  # (B,)
        return self.model(batch, start, kv_len=max(positions) + 1)[:, -1]  # (B, V)


# --- The scheduler ----------------------------------------------------------------------------------


class Scheduler:
    """Admits requests into the running batch between decode steps, in a background thread.

    Args:
        model: the transformer; its cache sizes the batch (max_batch_size) and the context (max_seq_len).
        tokenizer: for stop tokens and the text of each sequence.
        queue_size: most requests waiting for a slot; `submit` raises `QueueFull` beyond it.
        runner: what runs the steps (default: a `ModelRunner` on `model`).
    """

    def __init__(self, model: Transformer, tokenizer, *, queue_size: int = 64, runner: Optional[ModelRunner] = None):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_tokens = set(tokenizer.stop_tokens)
        self.max_batch_size = model.params.max_batch_size
        self.max_seq_len = model.params.max_seq_len
        self.queue_size = queue_size
        self.runner = runner or ModelRunner(model)
        self.device = self.runner.device

        self.waiting: Deque[Sequence] = collections.deque()  # guarded by _lock
        self.running: List[Sequence] = []  # running[i].row == i; only the scheduler thread changes it
        self._moves: List[Tuple[int, int, int]] = []  # cache moves for the next step
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Counters for /health. Every key exists from the start: other threads may read the dict at any time.
        reasons = ("stop", "length", "timeout", "cancelled", "error")
        keys = ("steps", "prefill_steps", "tokens", "rejected", *(f"finished_{r}" for r in reasons))
        self.stats = collections.Counter(dict.fromkeys(keys, 0))

    # --- The owner's side (any thread) ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; requests still in flight end with reason "error"; releases the other ranks."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            leftovers, self.waiting = self.running + list(self.waiting), collections.deque()
        self.running = []
        for seq in leftovers:
            self._finish(seq, "error", "the server is shutting down")
        self.runner.close()

    def submit(self, seq: Sequence) -> None:
        """Queues a sequence. Raises QueueFull when every slot is busy and queue_size sequences already wait."""
        if len(seq.prompt_tokens) == 0 or len(seq.prompt_tokens) >= self.max_seq_len:
            raise ValueError(f"a prompt needs 1 to {self.max_seq_len - 1} tokens, got {len(seq.prompt_tokens)}")
        with self._lock:
            free_slots = self.max_batch_size - len(self.running)
            if len(self.waiting) >= self.queue_size + max(free_slots, 0):
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self.running)} requests running and {len(self.waiting)} waiting")
            self.waiting.append(seq)
        self._wakeup.set()

    def health(self) -> dict:
        """A snapshot for monitoring: slots in use, queue length, counters."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "max_batch_size": self.max_batch_size,
            "queue_size": self.queue_size,
            **dict(self.stats),
        }

    # --- The loop (scheduler thread) ---

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._step()
                except Exception as e:  # a bug must not hang every client: end the batch, keep serving
                    logger.exception("scheduler step failed; ending the %d running requests", len(self.running))
                    for seq in self.running:
                        self._finish(seq, "error", f"internal error: {e}")
                    self.running, self._moves = [], []

    def _step(self) -> None:
        """One step: retire what was abandoned, then prefill newcomers, or decode, or wait for work."""
        self._retire_abandoned()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        elif self.running:
            self._decode()
        else:
            self._idle()

    def _idle(self) -> None:
        if not self._wakeup.wait(timeout=HEARTBEAT_SECONDS):
            self.runner.run(Step(moves=self._take_moves()))  # keeps the other ranks' broadcast alive
        self._wakeup.clear()

    def _admit(self) -> List[Sequence]:
        """Takes waiting sequences into the free slots, oldest first."""
        with self._lock:
            free_slots = self.max_batch_size - len(self.running)
            newcomers = [self.waiting.popleft() for _ in range(min(free_slots, len(self.waiting)))]
        for seq in newcomers:
            seq.text = TextStream(self.tokenizer, seq.stop)
            seq.generator = torch.Generator(self.device)
            if seq.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(seq.seed)
            seq.prompt = torch.tensor([seq.prompt_tokens], device=self.device)  # (1, L)
        return newcomers

    def _prefill(self, newcomers: List[Sequence]) -> None:
        """Prefills the newcomers into rows 0..k-1 and chooses their first tokens; the others wait one step."""
        n, k = len(self.running), len(newcomers)
        for seq in self.running[: min(n, k)]:  # rows 0..k-1 must be free: move their sequences past the end
            self._move(seq, seq.row + max(n, k))
        for row, seq in enumerate(newcomers):
            seq.row = row
        self.running = sorted(self.running + newcomers, key=lambda s: s.row)
        assert [s.row for s in self.running] == list(range(n + k)), "rows must stay compacted"
        logger.debug("admitting %d request(s) into a batch of %d", k, n)

        logits = self.runner.run(Step(moves=self._take_moves(), prompts=[s.prompt_tokens for s in newcomers]))
        self.stats["prefill_steps"] += 1
        self._advance(newcomers, logits)

    def _decode(self) -> None:
        """One decode step: each running row feeds its newest token at its own position."""
        tokens = [seq.generated[-1] for seq in self.running]
        positions = [seq.cache_len for seq in self.running]  # the newest token's position
        logits = self.runner.run(Step(moves=self._take_moves(), tokens=tokens, positions=positions))
        self.stats["steps"] += 1
        self._advance(self.running, logits)

    def _advance(self, seqs: List[Sequence], logits: torch.Tensor) -> None:
        """Chooses each sequence's next token from its row of logits (B, V), then frees the finished rows."""
        for seq, row_logits in zip(seqs, logits):
            reason = self._append(seq, self._choose(seq, row_logits[None]), row_logits)
            if reason is not None:
                self._finish(seq, reason)
        self._compact()

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> int:
        """The next token from logits (1, V) with the sequence's own params and generator, as `generate` does."""
        generated = torch.tensor(seq.generated, dtype=torch.long, device=self.device).reshape(1, -1)  # (1, t)
        return int(next_token(logits, generated, seq.params, seq.generator, prompt=seq.prompt)[0])

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor) -> Optional[str]:
        """Adds a token and sends the text it completes; returns why the sequence ends, if it does."""
        if token in self.stop_tokens:
            return "stop"
        seq.generated.append(token)
        self.stats["tokens"] += 1
        if seq.logprobs:
            seq.unsent.append(self._logprob(token, logits, seq.top_logprobs))
        piece = seq.text.push(token)
        if piece:
            self._send(seq, Delta(piece, seq.unsent))
            seq.unsent = []
        if seq.text.stopped:
            return "stop"
        limit = min(seq.max_new_tokens, self.max_seq_len - len(seq.prompt_tokens))
        return "length" if len(seq.generated) >= limit else None

    def _logprob(self, token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        """The token's log-probability under logits (V,), and the `top` most likely tokens'."""
        logprobs = torch.log_softmax(logits, dim=-1)  # (V,)
        best = torch.topk(logprobs, top) if top > 0 else None
        alternatives = [] if best is None else [
            (self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices)
        ]
        return TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]), alternatives)

    def _finish(self, seq: Sequence, reason: str, message: str = "") -> None:
        """Sends the held-back text and the `Finished` event; the row is freed by `_compact`."""
        if seq.done:
            return
        seq.done = True
        rest = seq.text.flush() if seq.text is not None and reason in ("stop", "length") else ""
        if rest or seq.unsent:
            self._send(seq, Delta(rest, seq.unsent))
        self._send(seq, Finished(reason, len(seq.prompt_tokens), len(seq.generated), message))
        self.stats[f"finished_{reason}"] += 1
        logger.debug("request %d finished (%s) after %d tokens", seq.id, reason, len(seq.generated))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # the owner is gone (e.g. its event loop closed): nothing to tell
            logger.debug("request %d: could not deliver %s", seq.id, type(event).__name__)

    def _retire_abandoned(self) -> None:
        """Ends the sequences whose owner left or whose time ran out, running or waiting."""
        now = time.monotonic()
        with self._lock:
            abandoned = [s for s in self.waiting if s.cancelled or s.expired(now)]
            for seq in abandoned:
                self.waiting.remove(seq)
        for seq in abandoned + self.running:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.expired(now):
                self._finish(seq, "timeout", "the request timed out")
        self._compact()

    def _compact(self) -> None:
        """Drops finished sequences; the rows past the new end move into the holes they left."""
        keep = [seq for seq in self.running if not seq.done]
        holes = iter([row for row in range(len(keep)) if self.running[row].done])
        for seq in keep:
            if seq.row >= len(keep):
                self._move(seq, next(holes))
        self.running = sorted(keep, key=lambda s: s.row)

    def _move(self, seq: Sequence, row: int) -> None:
        """Plans the move of a sequence's cache row (done at the start of the next step, on every rank)."""
        self._moves.append((seq.row, row, seq.cache_len))
        seq.row = row

    def _take_moves(self) -> List[Tuple[int, int, int]]:
        moves, self._moves = self._moves, []
        return moves


"""The server's side of the engine: HTTP requests in, events out, from one background thread.

The decoding itself is `llama.engine.Engine`'s (continuous batching: sequences
join and leave the batch between steps, rows compacted, prefill and decode
steps). This module owns the engine while the server runs, in a thread of its
own, and adds what a server needs around it:

    submit      any thread queues a `Job`; a full queue is refused (`QueueFull`, a 429)
    retire      before each step: jobs whose client left or whose time ran out end
    step        `Engine.step()`; each sequence's new text goes to its job's `sink`
    idle        no work: wait for some (under torchrun, a heartbeat step keeps the
                other ranks' broadcast from timing out)

Under `torchrun` rank 0 runs this thread and leads (`ModelRunner.lead`): every
step is broadcast and the other ranks run it in lockstep (`ModelRunner.follow`).
Sampling happens on rank 0 only: the logits are complete on every rank, and the
chosen tokens travel in the next step.
"""

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple
from typing import Sequence as SequenceType

import torch

from llama.engine import Engine, Request, TokenOutput
from llama.processors import SamplingParams

logger = logging.getLogger(__name__)

# Under torchrun, a broadcast that waits longer than the process group's timeout
# (30 minutes by default) fails: an idle rank 0 sends an empty step this often.
HEARTBEAT_SECONDS = 60.0


# --- What the scheduler tells a job's owner -----------------------------------------------------


@dataclass
class TokenLogprob:
    """One generated token with its log-probability (of the unprocessed distribution, as in `Llama.generate`)."""

    token: int
    text: str
    logprob: float
    top: List[Tuple[str, float]]  # the most likely tokens at this position, (text, logprob), best first


@dataclass
class Delta:
    """New text of one of a job's choices (may be "" when only logprobs arrive), the tokens that made
    it final, and on the choice's last delta why it ended ("stop" or "length")."""

    text: str
    logprobs: List[TokenLogprob]
    index: int = 0  # which of the job's n choices
    finish_reason: Optional[str] = None


@dataclass
class Finished:
    """The last event of a job.

    reason: "stop" (a stop token or stop string), "length" (max_tokens or the
    context is full) — of the choice that ended last —, "timeout", "cancelled"
    (its owner left) or "error". completion_tokens: of every choice.
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


Event = object  # Delta | Finished


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later."""


# --- One HTTP request --------------------------------------------------------------------------

_ids = itertools.count()


class Job:
    """One request's generation as the server sees it: its inputs, where its events go, its deadline.

    Args:
        prompt_tokens: the prompt's token ids (at least one, fewer than max_seq_len).
        max_new_tokens: most tokens generated; the end of the context stops it earlier.
        params: how each next token is chosen.
        sink: called from the scheduler thread with each `Delta` and the final
            `Finished`; it must not block (e.g. `loop.call_soon_threadsafe(queue.put_nowait, ...)`).
            Set it before `Scheduler.submit`.
        stop: strings that end the text before them.
        seed: seeds this job's own generator (None: a random seed).
        logprobs: report each token's log-probability ...
        top_logprobs: ... and this many most likely alternatives.
        timeout: seconds from submission after which it ends with reason "timeout".
        n: choices: sampled continuations of the prompt, drawn together from the job's generator.
        speculative: False: never drafted for, when the engine decodes speculatively.
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
        n: int = 1,
        speculative: bool = True,
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
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.n = n
        self.speculative = speculative

        self.request: Optional[Request] = None  # the engine's, built by `Scheduler.submit`
        self.unsent: List[List[TokenLogprob]] = [[] for _ in range(n)]  # per choice: logprobs of held-back text
        self.open = set(range(n))  # the choices still generating
        self.first_token_at: Optional[float] = None
        self.last_token_at: List[Optional[float]] = [None] * n  # per choice, for the time between tokens
        self.done = False
        self.cancelled = False

    def cancel(self) -> None:
        """Ends the job from any thread; its row is freed before the next step."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


# --- The scheduler thread ------------------------------------------------------------------------


class Scheduler:
    """Feeds submitted jobs to the engine and steps it, in a background thread.

    Args:
        engine: the decoding engine (`Llama.engine`); the scheduler thread is its only user while it runs.
        queue_size: most jobs waiting for a slot; `submit` raises `QueueFull` beyond it.
        metrics: told of every token and ending (`llama.metrics.ServerMetrics`), if given.
    """

    def __init__(self, engine: Engine, *, queue_size: int = 64, metrics=None):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.engine = engine
        self.runner = engine.runner
        self.tokenizer = engine.tokenizer
        self.max_batch_size = engine.max_batch_size
        self.max_seq_len = engine.max_seq_len
        self.queue_size = queue_size
        self.metrics = metrics

        self.inbox: Deque[Job] = collections.deque()  # submitted, not yet taken by the thread; guarded by _lock
        self.jobs: Dict[int, Job] = {}  # taken by the thread (waiting in the engine or running), by request id
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Counters for /health, beside the engine's. Every key exists from the start: other threads may read them.
        reasons = ("stop", "length", "timeout", "cancelled", "error")
        self.finished = collections.Counter(dict.fromkeys(("rejected", *(f"finished_{r}" for r in reasons)), 0))

    @property
    def stats(self) -> collections.Counter:
        """Steps, prefill steps and tokens (the engine's), rejected and finished jobs by reason."""
        return collections.Counter({**self.engine.counters, **self.finished})

    @property
    def running(self):
        """The engine's sequences in the batch, in row order."""
        return self.engine.running

    # --- The owner's side (any thread) ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llama-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; jobs still in flight end with reason "error"; releases the other ranks."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            leftovers = list(self.jobs.values()) + list(self.inbox)
            self.inbox.clear()
        for job in leftovers:
            self._finish(job, "error", "the server is shutting down")
        self.runner.close()

    def submit(self, job: Job) -> None:
        """Queues a job. Raises QueueFull when every slot is busy and queue_size jobs already wait,
        ValueError (the engine's check) when its prompt cannot fit the context."""
        generator = torch.Generator(self.engine.device)
        if job.seed is None:
            generator.seed()
        else:
            generator.manual_seed(job.seed)
        # Building a request only reads the engine's limits: safe from any thread.
        job.request = self.engine.request([job.prompt_tokens] * job.n, job.params, job.max_new_tokens,
                                          generator=generator, stop=job.stop, text=True, logprobs=job.logprobs,
                                          top_logprobs=job.top_logprobs, speculative=job.speculative)
        with self._lock:
            free_slots = self.max_batch_size - len(self.engine.running)
            if self._waiting() >= self.queue_size + max(free_slots, 0):
                self.finished["rejected"] += 1
                if self.metrics is not None:
                    self.metrics.requests.labels(reason="rejected").inc()
                raise QueueFull(f"{len(self.engine.running)} requests running and {self._waiting()} waiting")
            self.inbox.append(job)
        self._wakeup.set()

    def health(self) -> dict:
        """A snapshot for monitoring: slots in use, queue length, counters."""
        return {
            "running": len(self.engine.running),
            "waiting": self._waiting(),
            "max_batch_size": self.max_batch_size,
            "queue_size": self.queue_size,
            "prefix_cache_hit_rate": self.snapshot()["prefix_cache_hit_rate"],
            **dict(self.stats),
        }

    def snapshot(self) -> dict:
        """The gauges of /metrics: requests waiting and running, rows in use, KV-cache positions held."""
        prefix, counters = self.engine.prefix, self.engine.counters
        return {"waiting": self._waiting(), "running": len(self.engine.requests),
                "sequences": len(self.engine.running), "kv_cache_usage": self.engine.cache_usage,
                "prefix_cache_hit_rate": prefix.hit_rate if prefix is not None else 0.0,
                "spec_decode_acceptance_rate": counters["accepted_tokens"] / max(counters["draft_tokens"], 1)}

    def _waiting(self) -> int:
        return len(self.inbox) + len(self.engine.waiting)

    # --- The loop (scheduler thread) ---

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._step()
                except Exception as e:  # a bug must not hang every client: end the batch, keep serving
                    running = [job for job in self.jobs.values() if job.request in self.engine.requests]
                    logger.exception("scheduler step failed; ending the %d running requests", len(running))
                    for job in running:
                        self._finish(job, "error", f"internal error: {e}")

    def _step(self) -> None:
        """One step: retire what was abandoned, take the new jobs, step the engine or wait for work."""
        self._retire_abandoned()
        self._take_inbox()
        if not self.engine.has_work:
            self._idle()
            return
        counters = self.engine.counters
        drafted, accepted = counters["draft_tokens"], counters["accepted_tokens"]
        for output in self.engine.step():
            self._deliver(self.jobs[output.sequence.request.id], output)
        if self.metrics is not None and counters["draft_tokens"] > drafted:
            self.metrics.draft_tokens.inc(counters["draft_tokens"] - drafted)
            self.metrics.accepted_tokens.inc(counters["accepted_tokens"] - accepted)

    def _idle(self) -> None:
        if not self._wakeup.wait(timeout=HEARTBEAT_SECONDS):
            self.engine.idle_step()  # keeps the other ranks' broadcast alive
        self._wakeup.clear()

    def _take_inbox(self) -> None:
        """Hands the submitted jobs' requests to the engine, oldest first."""
        with self._lock:
            taken, self.inbox = list(self.inbox), collections.deque()
        for job in taken:
            self.jobs[job.request.id] = job
            self.engine.add(job.request)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(job.prompt_tokens))

    def _deliver(self, job: Job, output: TokenOutput) -> None:
        """Sends the text a new token made final (with the logprobs held back until then);
        ends the choice if it ended, and the job with its last choice."""
        index = job.request.sequences.index(output.sequence)
        generated = output.token not in output.sequence.stop.stop_tokens
        if generated:
            self._time_token(job, index)
        if job.logprobs and generated:
            job.unsent[index].append(self._logprob(output))
        if output.text or output.finish_reason is not None:
            self._send(job, Delta(output.text, job.unsent[index], index, output.finish_reason))
            job.unsent[index] = []
        if output.finish_reason is not None:
            job.open.discard(index)
            if not job.open:
                self._finish(job, output.finish_reason)

    def _time_token(self, job: Job, index: int) -> None:
        """Time to first token and between tokens, for the metrics."""
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if job.first_token_at is None:
                self.metrics.ttft.observe(now - job.submitted)
            elif job.last_token_at[index] is not None:
                self.metrics.tpot.observe(now - job.last_token_at[index])
        job.first_token_at = job.first_token_at or now
        job.last_token_at[index] = now

    def _logprob(self, output: TokenOutput) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = [(decode([i]), lp) for i, lp in output.top_logprobs or []]
        return TokenLogprob(output.token, decode([output.token]), output.logprob, top)

    def _finish(self, job: Job, reason: str, message: str = "") -> None:
        """Sends the held-back logprobs and the `Finished` event; frees the job's row in the engine."""
        if job.done:
            return
        job.done = True
        if job.request is not None:
            self.jobs.pop(job.request.id, None)
            self.engine.abort(job.request)  # nothing to do if it ended by itself
        for index, unsent in enumerate(job.unsent):
            if unsent:
                self._send(job, Delta("", unsent, index))
        completion_tokens = sum(seq.stop.num_tokens for seq in job.request.sequences) if job.request else 0
        self._send(job, Finished(reason, len(job.prompt_tokens), completion_tokens, message))
        self.finished[f"finished_{reason}"] += 1
        if self.metrics is not None:
            self.metrics.requests.labels(reason=reason).inc()
            self.metrics.e2e.observe(time.monotonic() - job.submitted)
        logger.debug("request %d finished (%s) after %d tokens", job.id, reason, completion_tokens)

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the owner is gone (e.g. its event loop closed): nothing to tell
            logger.debug("request %d: could not deliver %s", job.id, type(event).__name__)

    def _retire_abandoned(self) -> None:
        """Ends the jobs whose owner left or whose time ran out, wherever they are."""
        now = time.monotonic()
        with self._lock:
            abandoned = [job for job in self.inbox if job.cancelled or job.expired(now)]
            for job in abandoned:
                self.inbox.remove(job)
        for job in abandoned + list(self.jobs.values()):
            if job.cancelled:
                self._finish(job, "cancelled")
            elif job.expired(now):
                self._finish(job, "timeout", "the request timed out")

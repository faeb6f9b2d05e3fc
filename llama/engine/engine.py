"""The engine: one decoding loop under the library, the server, beam search and the explainer.

    engine.add(request)       queue a request (its sequences wait for free rows)
    engine.step()             admit and prefill the waiting requests that fit, or else
                              advance every running sequence by one decode step
    engine.abort(request)     drop a request, waiting or running, between steps (cancellation)

One step, told as the state machine it is:

    1. schedule     waiting requests that fit take rows 0..k-1 (the running rows move out of the way)
    2. run          prefill them (their first tokens), or one decode step for every running row
                    (with a speculator: drafts for the rows that speculate, verified in one pass)
    3. sample       each request's rows with its own controls and generator (`Sampler`)
    4. stop check   each sequence's `StopCriteria`: stop token, stop string, length limit
    5. release      requests whose every sequence has ended free their rows (compaction)

`Llama.generate` adds one request and steps until it is finished; the server's
thread adds requests as they come and steps forever.
"""

import collections
import contextlib
from dataclasses import dataclass
from typing import Callable, Deque, Iterator, List, Optional, Tuple

import torch

from llama.engine.kv_cache import CacheLayout, CacheRows
from llama.engine.model_runner import ModelRunner, Step
from llama.engine.prefix_cache import BLOCK_SIZE, PrefixIndex
from llama.engine.sampler import Group, Sampler
from llama.engine.sequence import Request, Sequence
from llama.engine.speculative import Speculator, can_speculate
from llama.engine.stopping import StopCriteria
from llama.processors import SamplingParams, pad_prompts


@dataclass
class TokenOutput:
    """What one step did to one sequence."""

    sequence: Sequence
    token: int  # the token sampled (a stop token too)
    text: str  # text that became final with it ("" unless the sequence decodes its text)
    finish_reason: Optional[str]  # "stop" or "length" when the sequence ended with this token
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # (id, log-probability), best first


# Called after each sampling with (request, its logits (k, V), its tokens (k,)): the explainer's view.
Observer = Callable[[Request, torch.Tensor, torch.Tensor], None]


class Engine:
    """Continuous batching of requests on one model.

    Args:
        runner: runs the model (and, under torchrun, keeps the ranks in lockstep).
        tokenizer: for the stop tokens and the text of the sequences.
        prefix_cache_tokens: keep the keys and values of up to this many tokens of earlier
            sequences and start new ones from their longest cached prefix (0: off; see
            `llama.engine.prefix_cache`).
        speculator: decode speculatively with its proposer (`llama.engine.speculative`); None: off.
    """

    def __init__(self, runner: ModelRunner, tokenizer, *, prefix_cache_tokens: int = 0,
                 speculator: Optional[Speculator] = None):
        self.runner = runner
        self.speculator = speculator
        self.tokenizer = tokenizer
        self.device = runner.device
        self.max_seq_len = runner.model.params.max_seq_len
        self.max_batch_size = runner.model.params.max_batch_size
        self.rows = CacheRows(self.max_batch_size)
        self.sampler = Sampler()
        self.waiting: Deque[Request] = collections.deque()
        self.requests: List[Request] = []  # running, in admission order
        # Speculative rounds are steps too; draft_tokens were proposed, accepted_tokens of them kept.
        self.counters = collections.Counter(steps=0, prefill_steps=0, tokens=0, speculative_steps=0, draft_tokens=0,
                                            accepted_tokens=0)
        self._observers: List[Observer] = []
        self.prefix: Optional[PrefixIndex] = None
        self.enable_prefix_cache(prefix_cache_tokens)

    def enable_prefix_cache(self, tokens: int) -> None:
        """Turns automatic prefix caching on with a budget of `tokens` (rounded down to whole blocks), or off (0)."""
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be an integer >= 0, got {tokens!r}")
        if tokens // BLOCK_SIZE == 0:
            self.prefix = None
        elif self.prefix is None or self.prefix.n_slots != tokens // BLOCK_SIZE:
            self.prefix = PrefixIndex(tokens // BLOCK_SIZE)  # every rank's store is made anew on the next step

    # --- Building requests ---

    def request(self, prompts: List[List[int]], params: SamplingParams, max_new_tokens: int, *,
                generator: torch.Generator, stop=(), text: bool = False, logprobs: bool = False,
                top_logprobs: int = 0, speculative: bool = True) -> Request:
        """A request continuing each prompt (one sequence each), not yet added.

        Args:
            prompts: token ids, each 1 to max_seq_len - 1 of them.
            params: the sampling controls, shared by every sequence.
            max_new_tokens: most tokens per sequence (the end of the context may stop it earlier).
            generator: every draw of the request comes from it.
            stop: stop strings.
            text: decode each sequence's text as it grows (`TokenOutput.text`).
            logprobs, top_logprobs: record each token's log-probability, and this many alternatives.
            speculative: False: never drafted for, when the engine speculates.
        """
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} sequences exceed max_batch_size={self.max_batch_size}")
        sequences = []
        for prompt in prompts:
            if not 0 < len(prompt) < self.max_seq_len:
                raise ValueError(f"a prompt needs 1 to {self.max_seq_len - 1} tokens, got {len(prompt)}")
            stop_criteria = StopCriteria(self.tokenizer, len(prompt), max_new_tokens, self.max_seq_len,
                                         stop=stop, text=text)
            sequences.append(Sequence(prompt, stop_criteria, logprobs=logprobs, top_logprobs=top_logprobs))
        return Request(sequences, params, generator, speculative=speculative)

    # --- Between steps (the driver's thread) ---

    def add(self, request: Request) -> None:
        """Queues the request; it is admitted when rows for all its sequences are free."""
        self.waiting.append(request)

    def abort(self, request: Request) -> None:
        """Removes the request, waiting or running; its rows are freed before the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.requests:
            self.requests.remove(request)
            self.rows.release(request.sequences)

    @property
    def running(self) -> List[Sequence]:
        """The sequences in the batch, in row order."""
        return self.rows.running

    @property
    def has_work(self) -> bool:
        return bool(self.requests or self.waiting)

    @property
    def cache_usage(self) -> float:
        """The share of the KV cache's positions (every row, every position) that running sequences hold."""
        held = sum(min(seq.cache_len, self.max_seq_len) for seq in self.running)
        return held / (self.max_batch_size * self.max_seq_len)

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.of(self.runner.model)

    @contextlib.contextmanager
    def observe(self, observer: Observer) -> Iterator[None]:
        """Calls `observer` after every sampling while the block runs."""
        self._observers.append(observer)
        try:
            yield
        finally:
            self._observers.remove(observer)

    # --- The step ---

    @torch.inference_mode()
    def step(self) -> List[TokenOutput]:
        """Prefills the waiting requests that fit, or else decodes one token for every running sequence.

        Returns what happened to each sequence that is still part of the result (sequences
        past their end but kept in the batch by their request are decoded, not reported).
        """
        newcomers = self._admit()
        if newcomers:
            sequences = [seq for request in newcomers for seq in request.sequences]  # rows 0..k-1
            logits = self.runner.run(self._prefill_step(sequences))
            self.counters["prefill_steps"] += 1
            if self.speculator is not None and any(can_speculate(request) for request in newcomers):
                self.speculator.prefill(self.runner, sequences)  # the draft reads the prompts now too
        elif self.requests:
            sequences = self.running
            if self.speculator is not None:
                outputs = self._speculate(sequences)
                if outputs is not None:
                    return outputs
            tokens = [seq.tokens[-1] for seq in sequences]
            positions = [min(seq.cache_len, self.max_seq_len - 1) for seq in sequences]  # a row past its end: last slot
            logits = self.runner.run(self._step(tokens=tokens, positions=positions))
            self.counters["steps"] += 1
        else:
            return []
        return self._advance(sequences, logits)

    def _speculate(self, sequences: List[Sequence]) -> Optional[List[TokenOutput]]:
        """A speculative round (`llama.engine.speculative`) in place of the decode step; None (nothing
        run but the row moves) when no row drafts a token."""
        moves = self.rows.take_moves()  # the draft's rows move with the model's, before it drafts
        if moves:
            self.runner.run(Step(moves=moves))
        round_ = self.speculator.propose(self.runner, sequences, self.max_seq_len)
        if round_ is None:
            return None
        drafts, dists = round_
        logits = self.runner.run(self._step(prompts=[[seq.tokens[-1]] + draft for seq, draft in zip(sequences, drafts)],
                                            starts=[seq.cache_len for seq in sequences], every_position=True))
        self.counters["steps"] += 1
        self.counters["speculative_steps"] += 1
        groups = self._groups(sequences)
        plain = [(request, rows) for request, rows in groups if not any(drafts[row] for row in rows)]
        new_tokens: List[List[int]] = [[] for _ in sequences]
        if plain:  # rows without drafts: the sampler's usual step, on the logits at their first position
            tokens = self.sampler(logits[:, 0], plain).tolist()
            for _, rows in plain:
                for row in rows:
                    new_tokens[row] = [tokens[row]]
        for request, rows in groups:
            if any(drafts[row] for row in rows):
                width = 1 + max(len(drafts[row]) for row in rows)
                tokens, accepted = self.speculator.accept(request, logits[rows, :width], [drafts[r] for r in rows],
                                                          [dists[r] for r in rows])
                for row, row_tokens in zip(rows, tokens):
                    new_tokens[row] = row_tokens
                self.counters["draft_tokens"] += sum(len(drafts[row]) for row in rows)
                self.counters["accepted_tokens"] += accepted
        return self._record(groups, new_tokens, logits)

    def _step(self, **pass_) -> Step:
        """A Step with the planned row moves (and the prefix cache's store size, if it is on)."""
        step = Step(moves=self.rows.take_moves(), **pass_)
        if self.prefix is not None:
            step.store = (self.prefix.n_slots, self.prefix.block_size)
        return step

    def _prefill_step(self, sequences: List[Sequence]) -> Step:
        """The prefill of the newcomers in rows 0..k-1: each from its longest cached prefix, if any."""
        if self.prefix is None:
            return self._step(prompts=[seq.prompt_tokens for seq in sequences])
        step = self._step(prompts=[], starts=[])
        # Every lookup before any new block is planned: those hold data only after this pass.
        matches = [self.prefix.match(seq.prompt_tokens) for seq in sequences]
        for row, (seq, cached) in enumerate(zip(sequences, matches)):
            start = len(cached) * self.prefix.block_size
            if cached:
                step.loads.append((row, cached))
            step.prompts.append(seq.prompt_tokens[start:])
            step.starts.append(start)
        for row, (seq, cached) in enumerate(zip(sequences, matches)):
            new_blocks = self.prefix.allocate(seq.prompt_tokens, len(cached))  # the prompt's, once computed
            if new_blocks is not None:
                step.saves_after.append((row, *new_blocks))
        return step

    def idle_step(self) -> None:
        """A step without a forward pass: carries out pending row moves (and keeps followers' broadcasts alive)."""
        self.runner.run(self._step())

    def _admit(self) -> List[Request]:
        """Waiting requests that fit, oldest first (a request too big for the free rows waits, and so do the rest)."""
        newcomers: List[Request] = []
        free = self.rows.free
        while self.waiting and len(self.waiting[0].sequences) <= free:
            request = self.waiting.popleft()
            free -= len(request.sequences)
            request.prompts = pad_prompts([s.prompt_tokens for s in request.sequences], self.device)  # (k, L)
            request.generated = torch.empty(len(request.sequences), 0, dtype=torch.long, device=self.device)
            newcomers.append(request)
        if newcomers:
            self.rows.admit([seq for request in newcomers for seq in request.sequences])
            self.requests.extend(newcomers)
        return newcomers

    @staticmethod
    def _groups(sequences: List[Sequence]) -> List[Group]:
        """Each request of the batch with its rows, in admission order."""
        index = {seq.id: row for row, seq in enumerate(sequences)}
        requests = list(dict.fromkeys(seq.request for seq in sequences))
        return [(r, [index[s.id] for s in r.sequences]) for r in requests]

    def _advance(self, sequences: List[Sequence], logits: torch.Tensor) -> List[TokenOutput]:
        """Samples the next token of every row of logits (B, V), runs the stop checks, releases what ended."""
        groups = self._groups(sequences)
        tokens = self.sampler(logits, groups).tolist()  # (B,): the step's one host-device sync
        return self._record(groups, [[token] for token in tokens], logits[:, None])

    def _record(self, groups: List[Group], new_tokens: List[List[int]], logits: torch.Tensor) -> List[TokenOutput]:
        """Appends each row's new tokens (the rows of a request: as many each), with their log-probabilities
        from logits (B, T, V) (token j of a row: position j), runs the stop checks, releases what ended."""
        outputs: List[TokenOutput] = []
        for request, rows in groups:
            want_logprobs = any(seq.want_logprobs for seq in request.sequences)
            for j in range(len(new_tokens[rows[0]])):
                if self._observers or want_logprobs:
                    column = torch.zeros(len(new_tokens), dtype=torch.long, device=logits.device)  # (B,)
                    column[rows] = torch.tensor([new_tokens[row][j] for row in rows], device=logits.device)
                for observer in self._observers:
                    observer(request, logits[rows, j], column[rows])
                if want_logprobs:
                    top = max(seq.top_logprobs for seq in request.sequences)
                    logprobs, alternatives = self.sampler.logprobs(logits[:, j], column, rows, top)
                for i, (seq, row) in enumerate(zip(request.sequences, rows)):
                    token = new_tokens[row][j]
                    ended = seq.finished  # before this token: decoded only to keep its request's draws
                    seq.tokens.append(token)
                    if seq.want_logprobs:
                        seq.logprobs.append(logprobs[i])
                    if ended:
                        continue
                    text, reason = seq.stop.append(token)
                    out = TokenOutput(seq, token, text, reason)
                    if seq.want_logprobs:
                        out.logprob = logprobs[i]
                        out.top_logprobs = alternatives[i][: seq.top_logprobs] if alternatives else None
                    outputs.append(out)
                    self.counters["tokens"] += token not in seq.stop.stop_tokens
        # Release once every row has its new token: a move copies the positions a row has filled.
        finished = [request for request, _ in groups if request.finished]
        if self.prefix is not None:  # their keys and values, saved now: nothing may overwrite the rows first
            saves = []
            for seq in (seq for request in finished for seq in request.sequences):
                filled = min(seq.cache_len, self.max_seq_len)
                new_blocks = self.prefix.allocate((seq.prompt_tokens + seq.tokens)[:filled], 0)
                if new_blocks is not None:
                    saves.append((seq.row, *new_blocks))
            if saves:
                self.runner.run(Step(store=(self.prefix.n_slots, self.prefix.block_size), saves_before=saves))
        for request in finished:
            self.requests.remove(request)
            self.rows.release(request.sequences)
        return outputs

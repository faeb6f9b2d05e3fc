"""The model runner: the only code that runs the model while decoding.

Two phases, as in TGI's model server:
    prefill(prompts)                 prompt i into cache row i, every prompt in one
                                     right-padded pass; logits at each prompt's last token
    decode_step(tokens, positions)   row i feeds tokens[i] at positions[i]; logits of the next tokens

Everything else the decoding loop asks of the model (cache-row moves, the
beams' reorder) travels with them in a `Step`. Under torchrun, when the server
leads (`lead()`), rank 0 broadcasts each `Step` and the other ranks run it in
lockstep on their shards (`follow()`); the library instead runs the same
program on every rank, each rank stepping its own runner.

Shapes: B rows in a step, k prompts, L longest prompt, V vocabulary, D model dim.
"""

import logging
import types
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from llama import kernels
from llama.engine.kv_cache import CacheLayout
from llama.model import Transformer
from llama.parallel import make_compilable

logger = logging.getLogger(__name__)

def compile_decode_step(step: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """The decode step, compiled for static shapes (one token per row, the whole cache read under
    a mask), once per batch bucket (`batch_bucket`).

    On GPUs it is replayed as a CUDA graph. On the CPU kernels each transformer block is one call to
    `llama.kernels.decode_block` in the graph, which leaves inductor the embedding, the final norm and
    the output projection: it compiles in seconds, and saves the eager step's Python between the
    same calls. Elsewhere (bf16, torchrun) the blocks are nested compile regions
    (`TransformerBlock`): traced and compiled once, their code runs for every layer, so the first
    compilation takes seconds, not the minutes of a 30-layer graph. The weights stay inputs of the
    graph (nothing is frozen into it), so inductor's on-disk caches apply and a later process loads
    the compiled code instead of compiling it again (`TORCHINDUCTOR_CACHE_DIR`, by default
    /tmp/torchinductor_$USER).
    """
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    # Before every call dynamo checks its guards, some 2,800 on SmolLM2, nearly all on the model's
    # modules (their types, attributes, tensors' shapes), and inductor's code asserts the size and
    # strides of each of its ~400 weight and cache inputs: on 2 cores 1.1 ms and 0.4 ms of a 6 ms int4
    # step (without them it took 4.9 ms instead of 6.0, then 5.5 instead of 5.95, each pair interleaved
    # in one process). A runner's model does not change once it runs (weights changed in place are read
    # at every call: they are graph inputs), so both go; the guards on the step's own inputs (shapes:
    # the batch bucket) and on global state stay, and the CPU kernels check their operands. Without the
    # module guards two runners' steps would share one compiled graph, since dynamo keeps its cache on
    # the function's code: each runner compiles a copy of that code (`_own_code`).
    return torch.compile(_own_code(step), fullgraph=True, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "size_asserts": False})


def _own_code(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The bound method `method` with a copy of its function's code object: code that dynamo caches apart."""
    function = method.__func__
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """The batch size a compiled step runs `rows` rows at: the next power of two (at most
    max_batch_size), so that a batch growing and shrinking reuses a few compiled graphs."""
    return min(1 << (rows - 1).bit_length(), max_batch_size)


@dataclass
class Step:
    """One step of the decoding loop, the same on every rank: cache-row moves, then at most one forward pass."""

    moves: List[Tuple[int, int, int]] = field(default_factory=list)  # (from row, to row, positions), in order
    prompts: Optional[List[List[int]]] = None  # prefill: prompt i into cache row i
    starts: Optional[List[int]] = None  # ... from position starts[i] (after a cached prefix), default 0
    # Prefix caching (`llama.engine.prefix_cache`): the block store's shape (slots, block size), blocks
    # saved before anything else (rows of requests that just ended), loaded after the moves, saved after the pass.
    store: Optional[Tuple[int, int]] = None
    saves_before: List[Tuple[int, int, List[int]]] = field(default_factory=list)  # (row, first block, slots)
    loads: List[Tuple[int, List[int]]] = field(default_factory=list)  # (row, slots): its positions 0..
    saves_after: List[Tuple[int, int, List[int]]] = field(default_factory=list)
    every_position: bool = False  # a prefill's logits at every position (k, L, V) (a speculative verify pass)
    tokens: Optional[List[int]] = None  # decode: row i feeds tokens[i] at positions[i]
    positions: Optional[List[int]] = None
    draft: bool = False  # the pass runs on the draft model (`ModelRunner.draft`), the moves on both
    shutdown: bool = False  # the other ranks leave `follow`


class ModelRunner:
    """Runs `Step`s on the model.

    Args:
        model: the transformer (its KV cache sizes the batch and the context).
        compile: compile the decode step (`compile_decode_step`): static shapes,
            the whole cache read under a mask, one compilation per batch size.
        draft: a draft model for speculative decoding (`llama.engine.speculative.DraftModel`),
            with a KV cache of the model's rows and positions; its passes are `Step`s with
            draft=True, run by `self.draft` (a runner of its own, compiled alike).
    """

    def __init__(self, model: Transformer, *, compile: bool = False, draft: Optional[Transformer] = None):
        self.model = model
        self.device = model.output.weight.device
        self.max_seq_len = model.params.max_seq_len
        self.compiled = compile
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.leading = False  # rank 0 broadcasts every step to followers
        self.block_pools: Optional[list] = None  # the prefix cache's block store, made on first use
        self._store: Optional[Tuple[int, int]] = None  # its (slots, block size)
        self._decode = self._decode_rows
        self.draft: Optional["ModelRunner"] = None
        if draft is not None:
            cache = CacheLayout.of(draft)
            if (cache.rows, cache.positions) != (model.params.max_batch_size, self.max_seq_len):
                raise ValueError(f"the draft's KV cache has {cache.rows} rows of {cache.positions} positions, the "
                                 f"model's {model.params.max_batch_size} of {self.max_seq_len}: build both alike")
            self.draft = ModelRunner(draft, compile=compile)
        if self.device.type == "cpu":
            kernels.load()  # built on first use, before any step is traced
        # fairscale's layers -> traceable twins with the same weights, which take the CPU kernels
        make_compilable(model)
        if compile:
            self._decode = compile_decode_step(self._decode_rows, self.device)

    # --- Lockstep under torchrun ---

    def lead(self) -> None:
        """From now on rank 0 sends every step to the other ranks, which run `follow()`."""
        self.leading = self.world_size > 1

    def run(self, step: Step) -> Optional[torch.Tensor]:
        """Runs the step (on rank 0 of a leading runner: on every rank); its logits (B, V), None without a pass."""
        if self.leading:
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
        if self.leading:
            try:
                self.run(Step(shutdown=True))
            except Exception as e:  # a rank already gone (killed): nothing left to release
                logger.warning("could not release the other ranks: %s", e)
            self.leading = False

    def execute(self, step: Step) -> Optional[torch.Tensor]:
        if step.store is not None and step.store != self._store:  # (a new index: its blocks are all new)
            self.block_pools, self._store = self.model.cache_block_pools(*step.store), step.store
        self._save_blocks(step.saves_before)
        for src, dst, length in step.moves:
            self.model.move_cache_row(src, dst, length)
            if self.draft is not None:
                self.draft.model.move_cache_row(src, dst, length)
        for row, slots in step.loads:
            self.model.load_cache_blocks(row, self.block_pools, self._slots(slots))
        runner = self.draft if step.draft else self
        logits = None
        if step.prompts:
            logits = runner.prefill(step.prompts, step.starts, every_position=step.every_position)
        elif step.tokens:
            logits = runner.decode_step(step.tokens, step.positions)
        self._save_blocks(step.saves_after)
        return logits

    def _save_blocks(self, saves: List[Tuple[int, int, List[int]]]) -> None:
        for row, first_block, slots in saves:
            self.model.save_cache_blocks(row, first_block, self.block_pools, self._slots(slots))

    def _slots(self, slots: List[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    # --- The two phases ---

    def prefill(self, prompts: List[List[int]], starts: Optional[List[int]] = None,
                every_position: bool = False) -> torch.Tensor:
        """Writes prompt i into cache row i, from position starts[i] on (0 by default; the positions
        before hold a cached prefix); returns fp32 logits (k, V) at each prompt's last position, or
        with every_position the logits (k, L, V) after every position (row i's first len(prompts[i])
        are its own). Always eager: prompts come in every length."""
        starts = starts or [0] * len(prompts)
        lengths = [len(p) for p in prompts]
        padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)  # (k, L), 0 = filler
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        if min(lengths) == max(lengths) and min(starts) == max(starts):
            start = starts[0]  # every row shares its positions (simplest path)
        else:
            start = torch.tensor(starts, dtype=torch.long, device=self.device)  # (k,)
        kv_len = max(s + n for s, n in zip(starts, lengths))
        hidden = self.model.forward_hidden(padded, start, kv_len=kv_len)  # (k, L, D)
        if every_position:
            return self.model.output(hidden).float()  # (k, L, V)
        last = torch.tensor(lengths, device=self.device) - 1
        last_hidden = hidden[torch.arange(len(prompts), device=self.device), last]  # (k, D)
        return self.model.output(last_hidden).float()  # (k, V)

    def decode_step(self, tokens: List[int], positions: List[int]) -> torch.Tensor:
        """Row i feeds tokens[i] at positions[i] (at most max_seq_len - 1); returns the logits (B, V)."""
        if not self.compiled:
            batch = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
            if min(positions) == max(positions):
                # Every row at one position (always so with one row): the reference's call, no mask.
                return self.model(batch, positions[0])[:, -1]
            return self._decode(batch, torch.tensor(positions, device=self.device), max(positions) + 1)
        # Compiled: static shapes. The whole cache is read (masked) whatever the positions, and the rows are
        # padded to a bucket: filler rows feed token 0 at position 0 of cache rows no sequence holds.
        rows = len(tokens)
        filler = batch_bucket(rows, self.model.params.max_batch_size) - rows
        batch = torch.tensor(tokens + [0] * filler, device=self.device)[:, None]  # (bucket, 1)
        start = torch.tensor(positions + [0] * filler, device=self.device)  # (bucket,)
        return self._decode(batch, start, self.max_seq_len)[:rows]

    def reorder(self, rows: torch.Tensor) -> None:
        """Cache row i takes the keys and values of row rows[i] (beam search: each beam follows its parent)."""
        self.model.reorder_cache(rows)

    def _decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits (B, V) of one new token per row (B, 1) at each row's position (B,)."""
        return self.model(tokens, positions, kv_len=kv_len)[:, -1]

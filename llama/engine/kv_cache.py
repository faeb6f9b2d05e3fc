"""Which sequence owns which row of the KV cache, and the row moves that keep them compacted.

The model computes rows 0..B-1 of its cache for a batch of B, so the sequences
in the batch are kept *compacted* in rows 0..n-1, in row order:

    admit k newcomers   move the sequences in rows 0..k-1 to free rows at the end,
                        then prefill the k prompts into rows 0..k-1 (one forward pass)
    decode step         every row feeds its newest token at its own position
    release             the finished sequences leave; the last rows move into the holes

A move copies only the positions a row has filled (`Sequence.cache_len`):
positions past a row's own are never read (the attention mask stops at each
row's position) and are overwritten before they are, so stale keys there are
harmless. Moves are planned here and carried out by the model runner at the
start of the next step, on every rank (`KVCache.move` in llama/model.py).
"""

from dataclasses import dataclass
from typing import List, Tuple

from llama.engine.sequence import Sequence
from llama.model import Transformer

Move = Tuple[int, int, int]  # (from row, to row, positions)


class CacheRows:
    """The rows of the KV cache: `running[i]` owns row i."""

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.running: List[Sequence] = []
        self._moves: List[Move] = []

    @property
    def free(self) -> int:
        return self.max_batch_size - len(self.running)

    def admit(self, newcomers: List[Sequence]) -> None:
        """Gives the newcomers rows 0..k-1, moving the sequences there past the end."""
        n, k = len(self.running), len(newcomers)
        assert k <= self.free, "admitted more sequences than free rows"
        for seq in self.running[: min(n, k)]:
            self._move(seq, seq.row + max(n, k))
        for row, seq in enumerate(newcomers):
            seq.row = row
        self.running = sorted(self.running + newcomers, key=lambda s: s.row)
        assert [s.row for s in self.running] == list(range(n + k)), "rows must stay compacted"

    def release(self, leaving: List[Sequence]) -> None:
        """Frees the rows of `leaving`; the rows past the new end move into the holes they leave."""
        gone = {seq.id for seq in leaving}
        keep = [seq for seq in self.running if seq.id not in gone]
        holes = iter([row for row in range(len(keep)) if self.running[row].id in gone])
        for seq in keep:
            if seq.row >= len(keep):
                self._move(seq, next(holes))
        for seq in leaving:
            seq.row = None
        self.running = sorted(keep, key=lambda s: s.row)

    def take_moves(self) -> List[Move]:
        """The moves planned since the last step, to be carried out before the next one."""
        moves, self._moves = self._moves, []
        return moves

    def _move(self, seq: Sequence, row: int) -> None:
        self._moves.append((seq.row, row, seq.cache_len))
        seq.row = row


@dataclass
class CacheLayout:
    """The shape of this rank's KV cache, read from its buffers: (rows, kv heads, positions, head dim) per layer."""

    layers: int
    rows: int
    heads: int
    positions: int
    head_dim: int
    dtype: str
    bytes_per_position: int  # k and v of one position of one row, every head, every layer
    allocated: int  # bytes of every buffer

    @staticmethod
    def of(model: Transformer) -> "CacheLayout":
        caches = [layer.attention.cache for layer in model.layers]
        rows, heads, positions, head_dim = caches[0].k.shape
        return CacheLayout(
            layers=len(caches), rows=rows, heads=heads, positions=positions, head_dim=head_dim,
            dtype=str(caches[0].k.dtype).removeprefix("torch."),
            bytes_per_position=2 * heads * head_dim * len(caches) * caches[0].k.element_size(),
            allocated=sum(c.k.nbytes + c.v.nbytes for c in caches),
        )

"""Automatic prefix caching: the keys and values of prompts seen before, reused by new sequences.

Chat clients resend the whole conversation every turn, and most requests share a system
prompt. The prefix cache keeps the keys and values of the tokens of finished and running
sequences in fixed-size blocks, indexed by a hash of the block's tokens and of every token
before it (vLLM's scheme: a block is found only after the same whole prefix). A new
sequence copies the blocks of its longest cached prefix into its own KV-cache row and
prefills only the rest of its prompt, from there on.

Why blocks of a hash chain rather than SGLang's radix tree: our KV cache keeps one
contiguous row per sequence, so a hit is a copy of whole blocks into that row either way;
hashed blocks make the index a dict and eviction an LRU list, with nothing to split.

    PrefixIndex (rank 0, the engine)    which blocks exist, in which slot of the store, LRU order
    the block store (every rank)        ModelRunner's pool: k, v (slots, Hkv, block, hd) per layer

The index decides; its decisions travel in each `Step` (loads, saves), so under torchrun
every rank's store holds the same blocks. Memory is bounded by the number of slots;
eviction takes the least recently used block. Nothing a running sequence reads is ever
evicted: running sequences read only their own rows.
"""

import collections
from typing import List, Optional, OrderedDict, Sequence, Tuple

BLOCK_SIZE = 16  # tokens a block holds


def block_keys(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> List[int]:
    """One key per whole block of tokens: the hash of the block's tokens and of the key before it."""
    keys, key = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = hash((key, tuple(tokens[start : start + block_size])))
        keys.append(key)
    return keys


class PrefixIndex:
    """Which blocks the store holds (by key), in which slot, least recently used first.

    Args:
        n_slots: blocks the store holds (its budget: n_slots * block_size tokens).
        block_size: tokens per block.
    """

    def __init__(self, n_slots: int, block_size: int = BLOCK_SIZE):
        if n_slots < 1:
            raise ValueError(f"the prefix cache needs at least one block, got {n_slots}")
        self.n_slots, self.block_size = n_slots, block_size
        self.slots: OrderedDict[int, int] = collections.OrderedDict()  # key -> slot, least recently used first
        self.free = list(range(n_slots - 1, -1, -1))
        self.lookups = 0  # prompt tokens looked up ...
        self.hits = 0  # ... and found cached

    def match(self, prompt: Sequence[int]) -> List[int]:
        """The slots of the prompt's longest cached prefix of whole blocks, leaving at least one
        token to prefill (its logits choose the first new token); marks them recently used."""
        usable = (len(prompt) - 1) // self.block_size
        found = []
        for key in block_keys(prompt[: usable * self.block_size], self.block_size):
            slot = self.slots.get(key)
            if slot is None:
                break
            self.slots.move_to_end(key)
            found.append(slot)
        self.lookups += len(prompt)
        self.hits += len(found) * self.block_size
        return found

    def allocate(self, tokens: Sequence[int], first_block: int) -> Optional[Tuple[int, List[int]]]:
        """Slots for the whole blocks of `tokens` from block `first_block` on that are not cached yet.

        Returns (the first block to save, its slots, one per block) or None. Blocks are saved
        from the first one missing on, so the cache always holds whole prefixes; the slots of
        least recently used blocks are taken when none is free.
        """
        keys = block_keys(tokens, self.block_size)
        start = first_block
        while start < len(keys) and keys[start] in self.slots:
            self.slots.move_to_end(keys[start])
            start += 1
        if start == len(keys):
            return None
        slots = []
        for key in keys[start:][: self.n_slots]:  # never more than the store holds: a slot once per save
            if self.free:
                slot = self.free.pop()
            else:
                _, slot = self.slots.popitem(last=False)  # the least recently used block gives its slot
            self.slots[key] = slot
            slots.append(slot)
        return start, slots

    @property
    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up that were found cached."""
        return self.hits / self.lookups if self.lookups else 0.0

"""Automatic prefix caching (`llama.engine.prefix_cache`): the index alone, then outputs with the
cache on equal to the cache off, in the library and through the server."""

import pytest
import torch

from llama import Llama
from llama.engine.prefix_cache import PrefixIndex, block_keys

SYSTEM = [128000] + list(range(1000, 1040))  # BOS + a 40-token "system prompt": 2 whole blocks of 16, and some


# --- The index ----------------------------------------------------------------------------------


def test_a_block_is_found_only_after_the_same_whole_prefix():
    a, b = block_keys([1, 2, 3, 4, 5, 6], 2), block_keys([9, 9, 3, 4, 5, 6], 2)
    assert len(a) == 3 and a[1] != b[1]  # the same tokens [3, 4] after another prefix: another block
    assert block_keys([1, 2, 3, 4, 5], 2) == a[:2]  # only whole blocks


def test_match_leaves_a_token_to_prefill_and_counts_hits():
    index = PrefixIndex(n_slots=8, block_size=2)
    assert index.allocate([1, 2, 3, 4, 5, 6], 0) == (0, [0, 1, 2])
    assert index.match([1, 2, 3, 4, 5, 6]) == [0, 1]  # not the last block: its last token must be prefilled
    assert index.match([1, 2, 3, 4, 5, 6, 7]) == [0, 1, 2]
    assert index.match([1, 2, 9]) == [0]
    assert index.hits == 12 and index.lookups == 16 and index.hit_rate == 12 / 16
    assert index.allocate([1, 2, 3, 4, 8, 8], 0) == (2, [3])  # the cached blocks are not saved again


def test_eviction_takes_the_least_recently_used_block_and_stays_within_budget():
    index = PrefixIndex(n_slots=3, block_size=2)
    index.allocate([1, 1, 2, 2], 0)  # blocks A, B
    index.allocate([3, 3], 0)  # block C: the store is full
    index.match([1, 1, 2, 2, 0])  # A and B used again: C is the least recently used
    start, slots = index.allocate([4, 4], 0)
    assert slots == [2] and index.match([3, 3, 0]) == []  # C gave its slot
    assert index.match([1, 1, 2, 2, 0]) == [0, 1]
    # D (slot 2) is now the least recently used, then A, B; never more blocks than slots, each slot once:
    assert index.allocate(list(range(20)), 0)[1] == [2, 0, 1]
    assert len(index.slots) == 3


# --- Outputs: on == off -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_args(tiny_checkpoints, llama3_tokenizer_path):
    return dict(ckpt_dir=tiny_checkpoints["gqa"], tokenizer_path=llama3_tokenizer_path, max_seq_len=96,
                max_batch_size=4)


@pytest.fixture(scope="module")
def pair(build_args):
    """The same checkpoint without and with a prefix cache (a small one: blocks get evicted)."""
    return Llama.build(**build_args), Llama.build(**build_args, prefix_cache_tokens=96)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_equal_the_cache_off(pair, temperature):
    off, on = pair
    batches = [
        [SYSTEM + [5, 6, 7], SYSTEM + [8, 9]],  # the first: nothing cached yet
        [SYSTEM + [10], SYSTEM[:20] + [3], [128000, 42, 43]],  # whole, partial and no hits in one prefill
        [SYSTEM + [5, 6, 7] + list(range(2000, 2030))],  # past the first answer's blocks
    ]
    for seed, prompts in enumerate(batches):
        kwargs = dict(temperature=temperature, seed=seed, logprobs=True)
        assert on.generate(prompts, 12, **kwargs) == off.generate(prompts, 12, **kwargs)
    assert on.engine.prefix.hits > 0
    assert len(on.engine.prefix.slots) <= 96 // 16  # the budget holds


def test_n_continuations_of_a_cached_prompt_equal_the_cache_off(pair):
    off, on = pair
    for _ in range(2):  # the second time, the prompt is cached
        kwargs = dict(temperature=1.0, seed=3, n=3)
        assert on.generate([SYSTEM + [1]], 8, **kwargs) == off.generate([SYSTEM + [1]], 8, **kwargs)


@torch.inference_mode()
def test_a_hit_loads_what_a_full_prefill_computes(pair):
    off, on = pair
    prompt = SYSTEM + [77, 78]
    on.generate([prompt], 1, temperature=0)  # caches the prompt's blocks
    on.generate([prompt], 1, temperature=0)  # row 0: blocks 0-1 loaded, the rest prefilled
    off.generate([prompt], 1, temperature=0)
    for cached, full in zip(on.model.layers, off.model.layers):
        n = len(prompt)
        torch.testing.assert_close(cached.attention.cache.k[0, :, :n], full.attention.cache.k[0, :, :n])
        torch.testing.assert_close(cached.attention.cache.v[0, :, :n], full.attention.cache.v[0, :, :n])


def test_blocks_of_an_ended_request_are_saved_before_echo_reuses_its_rows(pair, build_args):
    """echo with logprobs runs the prompts again on cache row 0 once the request has ended: the
    blocks of its answers must be saved before that (a follow-up turn loads them)."""
    off = pair[0]
    on = Llama.build(**build_args, prefix_cache_tokens=1024)  # room for every block
    other = SYSTEM + list(range(3000, 3019))  # 60 tokens: its 4th block ends in its answer
    first = SYSTEM[:30] + list(range(5000, 5021))  # differs from position 30 on
    outputs = []
    for llama in (off, on):
        (answered, _), _ = llama.generate([other, first], 20, temperature=0, min_gen_len=20, logprobs=True,
                                          echo=True)
        outputs.append(answered)
    assert outputs[0] == outputs[1]
    follow_up = outputs[0] + [7, 8, 9]  # the dialog so far, and more: loads the block holding the answer
    assert on.generate([follow_up], 6, temperature=0) == off.generate([follow_up], 6, temperature=0)

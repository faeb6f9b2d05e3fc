"""Logits processors and sampling: each processor by hand, validation, and on a tiny model."""

import math

import pytest
import torch

from llama.checkpoint import _skip_fairscale_init
from llama.model import ModelArgs, Transformer
from llama.processors import (
    SamplingParams,
    add_logit_bias,
    ban_bad_words,
    min_new_tokens,
    min_p_mask,
    next_token,
    pad_prompts,
    presence_frequency_penalty,
    repetition_penalty,
    sample_top_p,
    temperature_scale,
    token_counts,
    top_k,
    top_p_mask,
)
from tests.conftest import TINY_PARAMS, random_state_dict

# The tiny test model with a small vocabulary: a (100, V) batch of logits stays cheap.
SMALL_VOCAB = {**TINY_PARAMS, "vocab_size": 512}
INF = math.inf


def tiny_model(state: dict, params: dict = SMALL_VOCAB, max_seq_len: int = 32, max_batch_size: int = 4) -> Transformer:
    """A Transformer holding `state`, built in memory."""
    args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    with torch.device("meta"), _skip_fairscale_init():
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.setup_caches(max_batch_size, max_seq_len)
    return model


# --- Each processor against a hand-computed expectation ----------------------------------------


def test_token_counts_skip_padding():
    tokens = torch.tensor([[-1, 2, 2, 0], [-1, -1, 3, 1]])
    assert token_counts(tokens, 4).tolist() == [[1, 0, 2, 0], [0, 1, 0, 1]]


def test_pad_prompts_pads_on_the_left():
    assert pad_prompts([[5, 6, 7], [8]]).tolist() == [[5, 6, 7], [-1, -1, 8]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    context = torch.tensor([[-1, 0, 1, 1]])  # tokens 0 and 1 seen (once or twice: the same)
    assert repetition_penalty(logits, context, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert repetition_penalty(logits, context, 1.0) is logits


def test_presence_and_frequency_penalties_count_generated_tokens():
    logits = torch.zeros(1, 4)
    generated = torch.tensor([[1, 1, 2]])
    out = presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.5 - 2 * 0.25, -0.5 - 0.25, 0.0]]
    assert presence_frequency_penalty(logits, generated, 0.0, 0.0) is logits


def test_bad_words_ban_last_token_only_after_their_prefix():
    logits = torch.zeros(2, 6)
    context = torch.tensor([[5, 1, 2], [5, 1, 3]])
    bad_words = [[4], [2, 3], [1, 3, 0], [0, 0, 0, 0, 1]]  # the last is longer than the context
    out = ban_bad_words(logits, context, bad_words)
    assert out.tolist() == [
        [0, 0, 0, -INF, -INF, 0],  # always 4; 3 after 2
        [-INF, 0, 0, 0, -INF, 0],  # always 4; 0 after 1, 3
    ]
    assert ban_bad_words(logits, context, []) is logits
    # With nothing generated yet, only single-token words apply.
    assert ban_bad_words(logits, torch.empty(2, 0, dtype=torch.long), bad_words)[:, 4].tolist() == [-INF, -INF]


def test_min_new_tokens_masks_stop_tokens_until_enough_were_generated():
    logits = torch.zeros(1, 4)
    assert min_new_tokens(logits, 1, 2, [1, 3]).tolist() == [[0, -INF, 0, -INF]]
    assert min_new_tokens(logits, 2, 2, [1, 3]) is logits
    assert logits.tolist() == [[0, 0, 0, 0]]  # the input is left alone


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [1.0, 3.0, 2.0, 3.0]])
    assert temperature_scale(logits, 0.5).tolist() == [[2.0, 8.0, 4.0, 6.0], [2.0, 6.0, 4.0, 6.0]]
    assert top_k(logits, 2).tolist() == [[-INF, 4.0, -INF, 3.0], [-INF, 3.0, -INF, 3.0]]  # ties with the k-th kept
    assert top_k(logits, 0) is logits and top_k(logits, 4) is logits


def test_top_p_and_min_p_masks_on_sorted_probabilities():
    probs_sort = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_mask(probs_sort, 0.7).tolist() == [[False, False, True, True]]  # 0.5 + 0.3 reaches 0.7
    assert top_p_mask(probs_sort, 0.9).tolist() == [[False, False, False, True]]
    assert min_p_mask(probs_sort, 0.2).tolist() == [[False, False, False, True]]  # below 0.2 * 0.5
    assert min_p_mask(probs_sort, 0.0).tolist() == [[False] * 4]


def test_sample_top_p_with_min_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    generator = torch.Generator().manual_seed(0)
    assert {int(sample_top_p(probs.clone(), 1.0, generator, min_p=0.2)) for _ in range(200)} == {0, 1, 3}
    assert {int(sample_top_p(probs.clone(), 0.7, generator, min_p=0.2)) for _ in range(200)} == {1, 3}


def test_greedy_takes_the_best_token_left_by_the_processors():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    generated = torch.tensor([[2]])
    assert next_token(logits, generated, SamplingParams(temperature=0)).tolist() == [1]
    assert next_token(logits, generated, SamplingParams(temperature=0, bad_words=[[1]])).tolist() == [2]
    # 2 was generated: 2.0 / 4 = 0.5 falls below token 3's 1.0.
    params = SamplingParams(temperature=0, bad_words=[[1]], repetition_penalty=4.0)
    assert next_token(logits, generated, params).tolist() == [3]


# --- The default path is the reference's sampler ------------------------------------------------


@pytest.mark.parametrize("temperature, top_p", [(0.6, 0.9), (1.0, 1.0), (1.3, 0.5)])
def test_default_path_draws_what_sample_top_p_draws(temperature, top_p):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(temperature=temperature, top_p=top_p)
    ours, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    generated = torch.empty(4, 0, dtype=torch.long)
    for _ in range(20):
        got = next_token(logits, generated, params, ours)
        expected = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, reference).reshape(-1)
        assert torch.equal(got, expected)
        generated = torch.cat([generated, got[:, None]], dim=1)
    assert torch.equal(ours.get_state(), reference.get_state())


def test_generation_sample_top_p_is_this_sampler():
    """`from llama.generation import sample_top_p` (the reference's name) draws what this one draws."""
    from llama.generation import sample_top_p as reference_name

    probs = torch.softmax(torch.randn(3, 100, generator=torch.Generator().manual_seed(2)), dim=-1)
    for p in (0.5, 0.9, 1.0):
        expected = sample_top_p(probs.clone(), p, torch.Generator().manual_seed(3))
        assert torch.equal(reference_name(probs.clone(), p, torch.Generator().manual_seed(3)), expected)


# --- Validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, r"temperature must be >= 0"),
        ({"temperature": math.nan}, r"temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k must be an integer >= 0"),
        ({"top_k": 2.5}, r"top_k must be an integer >= 0"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"min_gen_len": -1}, r"min_gen_len must be an integer >= 0"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"bad_words": [[]]}, r"bad_words must be non-empty lists of token ids"),
        ({"bad_words": [[1, -2]]}, r"bad_words must be non-empty lists of token ids"),
        ({"bad_words": [5]}, r"bad_words must be a list of token-id lists"),
        ({"stop_tokens": [-1]}, r"stop_tokens must be token ids"),
        ({"logit_bias": {3: 101}}, r"logit_bias must map token ids >= 0 to biases in \[-100, 100\]"),
        ({"logit_bias": {-1: 1.0}}, r"logit_bias must map token ids >= 0"),
        ({"logit_bias": [5]}, r"logit_bias must map token ids to biases"),
    ],
)
def test_validation_names_the_argument_and_its_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_adds_what_transformers_sequence_bias_adds():
    """OpenAI's logit_bias against an independent implementation: transformers' SequenceBiasLogitsProcessor
    with one-token sequences."""
    transformers = pytest.importorskip("transformers")
    bias = {3: 2.5, 7: -100.0, 0: 0.75}
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    reference = transformers.SequenceBiasLogitsProcessor({(token,): value for token, value in bias.items()})
    expected = reference(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    got = add_logit_bias(logits, SamplingParams(logit_bias=bias).logit_bias)
    torch.testing.assert_close(got, expected)
    assert add_logit_bias(logits, ()) is logits  # off: the input itself


def test_params_are_frozen_and_hashable():
    params = SamplingParams(bad_words=[[1, 2], [3]], stop_tokens=[7])
    assert params.bad_words == ((1, 2), (3,)) and params.stop_tokens == (7,)
    assert params.validate() is params
    assert hash(params) == hash(SamplingParams(bad_words=[(1, 2), (3,)], stop_tokens=(7,)))
    with pytest.raises(AttributeError):
        params.top_k = 3


# --- On a tiny model ------------------------------------------------------------------------------

A, B, C, STOP = 10, 11, 12, 13  # tokens the biased model prefers


@pytest.fixture(scope="module")
def biased_state():
    """Weights whose next-token distribution puts nearly all its mass on A, B, C and STOP, evenly:
    every embedding carries a large constant in dimension 0, which survives the layers and
    the final norm, and those four output rows read only it."""
    state = random_state_dict(SMALL_VOCAB, seed=7)
    state["tok_embeddings.weight"][:, 0] = 4.0
    state["output.weight"][[A, B, C, STOP]] = 0.0
    state["output.weight"][[A, B, C, STOP], 0] = 8.0
    return state


def sample_continuations(model, prompt, n, steps, params, seed=0):
    """n sampled continuations (n, steps) of one prompt, decoded as a batch, with `next_token`."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.tensor([prompt] * n)  # (n, L)
    logits = model(prompts, 0)[:, -1]  # (n, V)
    generated = torch.empty(n, 0, dtype=torch.long)
    for step in range(steps):
        token = next_token(logits, generated, params, generator, prompt=prompts)  # (n,)
        generated = torch.cat([generated, token[:, None]], dim=1)
        logits = model(token[:, None], len(prompt) + step)[:, -1]
    return generated.tolist()


def contains(sequence, word):
    return any(sequence[i : i + len(word)] == word for i in range(len(sequence) - len(word) + 1))


@torch.inference_mode()
def test_bad_words_never_appear_in_sampled_continuations(biased_state):
    model = tiny_model(biased_state, max_batch_size=100)
    prompt = [1, 300, 42, B]
    free = sample_continuations(model, prompt, 100, 8, SamplingParams(temperature=1.0, top_p=1.0))
    assert sum(A in row for row in free) >= 80  # the bias works: A is nearly everywhere
    assert sum(contains([B] + row, [B, C]) for row in free) >= 30

    params = SamplingParams(temperature=1.0, top_p=1.0, bad_words=[[A], [B, C]])
    banned = sample_continuations(model, prompt, 100, 8, params)
    assert not any(A in row for row in banned)
    assert not any(contains([B] + row, [B, C]) for row in banned)  # the prompt's B counts as a prefix
    assert any(B in row for row in banned) and any(C in row for row in banned)  # each alone is allowed


@torch.inference_mode()
def test_min_gen_len_masks_stop_tokens(biased_state):
    model = tiny_model(biased_state, max_batch_size=100)
    prompt = [1, 300, 42]
    params = SamplingParams(temperature=1.0, top_p=1.0, bad_words=[[A], [B], [C]])  # leaves STOP the favourite
    free = sample_continuations(model, prompt, 100, 1, params)
    assert sum(row[0] == STOP for row in free) >= 90

    params = SamplingParams(
        temperature=1.0, top_p=1.0, bad_words=[[A], [B], [C]], min_gen_len=5, stop_tokens=[STOP]
    )
    rows = sample_continuations(model, prompt, 100, 6, params)
    assert not any(STOP in row[:5] for row in rows)
    assert sum(row[5] == STOP for row in rows) >= 90  # allowed again from the sixth token

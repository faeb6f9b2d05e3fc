"""Beam search: greedy with one beam, token-for-token parity with transformers, one prefill."""

import pytest
import torch

from llama.beam_search import beam_search, beam_search_hypotheses
from llama.processors import SamplingParams
from tests.conftest import random_state_dict
from tests.test_processors import SMALL_VOCAB, tiny_model

PROMPT = [1, 17, 300, 42, 99]
MAX_NEW = 12


@pytest.fixture(scope="module")
def state():
    return random_state_dict(SMALL_VOCAB, seed=11)


@pytest.fixture(scope="module")
def model(state):
    return tiny_model(state, max_seq_len=32, max_batch_size=4)


def greedy(model, prompt, n_new):
    """Greedy decoding by full recomputation: no cache reuse."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            tokens.append(int(model(torch.tensor([tokens]), 0)[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def greedy_tokens(model):
    return greedy(model, PROMPT, MAX_NEW)


def test_one_beam_is_greedy(model, greedy_tokens):
    assert beam_search(model, PROMPT, MAX_NEW, num_beams=1) == greedy_tokens
    stop = greedy_tokens[3]
    cut = greedy_tokens.index(stop)
    assert beam_search(model, PROMPT, MAX_NEW, num_beams=1, stop_tokens=[stop]) == greedy_tokens[:cut]


@pytest.fixture(scope="module")
def reference(state):
    """transformers' LlamaForCausalLM with the same weights."""
    pytest.importorskip("transformers")
    from tests.test_model import hf_model_from_meta

    return hf_model_from_meta(SMALL_VOCAB, state)


def hf_beam_search(reference, stop_tokens, **kwargs):
    """transformers' beam search: the best sequence's new tokens, cut before its stop token."""
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=list(stop_tokens) or None,
            pad_token_id=0,
            **kwargs,
        )
    new = out[0, len(PROMPT) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stop_tokens), len(new))]


# (num_beams, length_penalty, early_stopping, stop tokens as positions in the greedy continuation)
CASES = [
    (2, 1.0, False, []),
    (2, 1.0, False, [2]),
    (2, 2.0, True, [1]),
    (4, 1.0, False, [2]),
    (4, 0.5, False, [1, 4]),
    (4, 2.0, True, [2]),
    (4, -1.0, "never", [3]),
    (3, 1.0, True, [0, 5, 7]),  # three stop tokens: 4 * num_beams candidates a step
]


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, stop_at", CASES)
def test_matches_transformers(reference, model, greedy_tokens, num_beams, length_penalty, early_stopping, stop_at):
    stop_tokens = sorted({greedy_tokens[i] for i in stop_at})  # tokens the search does meet
    expected = hf_beam_search(
        reference, stop_tokens, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping
    )
    got = beam_search(model, PROMPT, MAX_NEW, num_beams, length_penalty, early_stopping, stop_tokens)
    assert got == expected


def test_processors_match_transformers(reference, model, greedy_tokens):
    """Repetition penalty, bad words and a minimum length apply to the log-probabilities, as in transformers."""
    stop, banned = greedy_tokens[1], [PROMPT[-1], greedy_tokens[0]]
    expected = hf_beam_search(
        reference, [stop], num_beams=3, repetition_penalty=1.3, bad_words_ids=[banned], min_new_tokens=3
    )
    params = SamplingParams(repetition_penalty=1.3, bad_words=[banned], min_gen_len=3, stop_tokens=[stop])
    assert beam_search(model, PROMPT, MAX_NEW, 3, stop_tokens=[stop], params=params) == expected


def test_stop_tokens_end_hypotheses(model, greedy_tokens):
    """A stop token the beams meet early ends the best hypothesis before max_gen_len."""
    got = beam_search(model, PROMPT, MAX_NEW, 2, stop_tokens=[greedy_tokens[2]])
    assert len(got) < MAX_NEW


def test_hypotheses_are_scored_and_sorted(model):
    length_penalty = 0.5
    hypotheses = beam_search_hypotheses(model, PROMPT, 6, num_beams=3, length_penalty=length_penalty)
    assert len(hypotheses) == 3
    assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    for h in hypotheses:  # no stop tokens: every hypothesis runs to max_gen_len
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + h.tokens]), 0)[0, len(PROMPT) - 1 : -1]  # (6, V)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(h.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(h.logprobs), logprobs, atol=1e-4)
        assert h.score == pytest.approx(logprobs.sum().item() / 6**length_penalty, abs=1e-4)


def test_cache_is_reordered_not_recomputed(model):
    """One prefill of the prompt, then one token per beam per step."""
    shapes, reorders = [], []
    hook = model.layers[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    original = model.reorder_cache
    model.reorder_cache = lambda rows: (reorders.append(rows.tolist()), original(rows))
    try:
        beam_search(model, PROMPT, 8, num_beams=4)
    finally:
        hook.remove()
        del model.reorder_cache
    assert shapes == [(1, len(PROMPT))] + [(4, 1)] * 7  # (B, T) of each forward
    assert len(reorders) == 7 and reorders[0] == [0, 0, 0, 0]  # the first step: every beam extends the prompt


def test_more_beams_than_cache_rows(model):
    with pytest.raises(ValueError, match="num_beams=5 exceeds max_batch_size=4"):
        beam_search(model, PROMPT, 4, num_beams=5)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        beam_search(model, PROMPT, 4, num_beams=2, early_stopping="sometimes")

"""generate's sampling controls, stop strings, n and beam search, on the tiny checkpoint."""

import pytest

from llama import Llama
from llama.beam_search import beam_search


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=64, max_batch_size=4)


PROMPT = [128000, 791, 6864, 315]


def test_seed_per_call(generator):
    first = generator.generate([PROMPT], max_gen_len=10, temperature=1.0, top_p=1.0, seed=5)[0]
    generator.generate([PROMPT], max_gen_len=3, temperature=1.0)  # moves the shared generator on
    again = generator.generate([PROMPT], max_gen_len=10, temperature=1.0, top_p=1.0, seed=5)[0]
    assert first == again


def test_n_samples_per_prompt(generator):
    tokens, logprobs = generator.generate(
        [PROMPT, [128000, 40]], max_gen_len=6, temperature=1.0, top_p=1.0, n=2, seed=1, logprobs=True
    )
    assert len(tokens) == 4 and len(logprobs) == 4
    assert tokens[0] != tokens[1]  # two draws of prompt 0
    with pytest.raises(ValueError, match=r"3 prompts x n=2 exceed max_batch_size=4"):
        generator.generate([PROMPT] * 3, max_gen_len=2, n=2)


def test_bad_words_as_text_and_ids(generator):
    greedy = generator.generate([PROMPT], max_gen_len=6, temperature=0)[0][0]
    banned = generator.generate([PROMPT], max_gen_len=6, temperature=0, bad_words=[[greedy[0]]])[0][0]
    assert greedy[0] not in banned
    word = generator.tokenizer.decode([greedy[0]])
    as_text = generator.generate([PROMPT], max_gen_len=6, temperature=0, bad_words=[word.strip()])[0][0]
    assert greedy[0] not in as_text


def test_stop_strings(generator):
    greedy = generator.generate([PROMPT], max_gen_len=8, temperature=0)[0][0]
    text = generator.tokenizer.decode(greedy)
    stop = generator.tokenizer.decode(greedy[3:5])
    tokens = generator.generate([PROMPT], max_gen_len=8, temperature=0, stop=[stop])[0][0]
    assert tokens == greedy[:5]
    prompt_text = generator.tokenizer.decode(PROMPT[1:])
    (result,) = generator.text_completion([prompt_text], max_gen_len=8, temperature=0, stop=[stop])
    assert result["generation"] == text[: text.find(stop)]


def test_min_gen_len(generator):
    stop = generator.tokenizer.stop_tokens
    gen = generator.generate([PROMPT], max_gen_len=12, temperature=1.0, top_p=1.0, min_gen_len=12, seed=0)[0][0]
    assert len(gen) == 12 and not set(gen) & set(stop)


def test_beams_in_generate(generator):
    tokens, logprobs = generator.generate([PROMPT, [128000, 40]], max_gen_len=6, num_beams=3, n=2, logprobs=True)
    assert len(tokens) == 4 and [len(t) for t in tokens] == [len(lp) for lp in logprobs]
    assert tokens[0] == beam_search(generator.model, PROMPT, 6, 3, stop_tokens=generator.tokenizer.stop_tokens)
    with pytest.raises(ValueError, match="num_beams=5 exceeds max_batch_size=4"):
        generator.generate([PROMPT], max_gen_len=2, num_beams=5)
    with pytest.raises(ValueError, match="n=4 exceeds num_beams=3"):
        generator.generate([PROMPT], max_gen_len=2, num_beams=3, n=4)
    (result,) = generator.text_completion(["Hello"], max_gen_len=4, num_beams=2)
    assert isinstance(result["generation"], str)


def test_beams_with_echo_and_no_logprobs(generator):
    """echo without logprobs used to fail in beam search (a TypeError reading absent prompt logprobs)."""
    (tokens,), logprobs = generator.generate([PROMPT], max_gen_len=4, num_beams=2, echo=True)
    assert logprobs is None
    assert tokens == PROMPT + beam_search(generator.model, PROMPT, 4, 2, stop_tokens=generator.tokenizer.stop_tokens)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
        ({"bad_words": [[128256]]}, "outside the vocabulary"),
        ({"n": 0}, "n must be an integer >= 1"),
    ],
)
def test_bad_control_arguments(generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator.generate([PROMPT], max_gen_len=2, **kwargs)


def test_chat_completion_with_options(generator):
    dialogs = [[{"role": "user", "content": "hi"}]]
    results = generator.chat_completion(dialogs, max_gen_len=4, n=2, top_k=5, seed=0)
    assert len(results) == 2


def test_logit_bias_forces_and_bans_tokens(generator):
    options = dict(max_gen_len=5, temperature=0)
    (free,), _ = generator.generate([PROMPT], **options)
    (forced,), _ = generator.generate([PROMPT], logit_bias={42: 100}, **options)
    assert forced == [42] * 5
    (banned,), _ = generator.generate([PROMPT], logit_bias={free[0]: -100}, **options)
    assert banned[0] != free[0]
    sampled = generator.generate([PROMPT], logit_bias={42: 100}, max_gen_len=5, temperature=1.0, seed=0)[0][0]
    assert sampled == [42] * 5
    with pytest.raises(ValueError, match="not a token id of the vocabulary"):
        generator.generate([PROMPT], logit_bias={128256: 1.0}, **options)

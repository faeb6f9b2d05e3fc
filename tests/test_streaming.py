"""Streaming: `TextStream` on real tokens, and `Llama.stream` against the batch API."""

import pytest

from llama import Llama
from llama.streaming import TextStream
from llama.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_path):
    return load_tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=64, max_batch_size=2)


def pieces_of(tokenizer, tokens, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokens:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return [p for p in pieces if p], stream


def test_a_character_split_over_tokens_is_yielded_whole(tokenizer):
    tokens = tokenizer.encode("a🦙b 你好", bos=False, eos=False)
    assert [tokenizer.decode([t]) for t in tokens[1:4]] == ["\ufffd"] * 3  # the llama's 4 bytes in 3 tokens
    pieces, _ = pieces_of(tokenizer, tokens)
    assert "".join(pieces) == "a🦙b 你好"
    assert "🦙" in pieces and not any("\ufffd" in p for p in pieces)


def test_a_stop_string_spanning_tokens_ends_the_stream_before_it(tokenizer):
    tokens = tokenizer.encode("The quick brown fox jumps over", bos=False, eos=False)
    pieces, stream = pieces_of(tokenizer, tokens, stop=["brown fox"])
    assert "".join(pieces) == "The quick "
    assert stream.stopped and len(stream.tokens) == 4  # " fox" completed it; nothing after was read


def test_text_that_only_looks_like_a_stop_string_is_released(tokenizer):
    tokens = tokenizer.encode("The quick brown dog", bos=False, eos=False)
    pieces, stream = pieces_of(tokenizer, tokens, stop=["brown fox"])
    assert "".join(pieces) == "The quick brown dog" and not stream.stopped
    # "brown" was held back while it could still begin "brown fox".
    assert pieces == ["The", " quick", " ", "brown dog"]


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement(tokenizer):
    tokens = tokenizer.encode("ok🦙", bos=False, eos=False)[:-1]  # cut inside the llama's bytes
    pieces, _ = pieces_of(tokenizer, tokens)
    assert "".join(pieces) == "ok\ufffd"


@pytest.mark.parametrize("options", [{}, {"stop": ["a"]}, {"stop": [" the", "\n"], "top_k": 5}])
def test_stream_joins_to_text_completion(generator, options):
    prompt = "The capital of France is"
    expected = generator.text_completion([prompt], temperature=0, max_gen_len=24, **options)[0]["generation"]
    assert "".join(generator.stream(prompt, temperature=0, max_gen_len=24, **options)) == expected
    sampled = generator.text_completion([prompt], temperature=1.0, max_gen_len=24, seed=5, **options)
    assert "".join(generator.stream(prompt, temperature=1.0, max_gen_len=24, seed=5, **options)) == sampled[0][
        "generation"
    ]


def test_stream_joins_to_chat_completion(generator):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = generator.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]["content"]
    assert "".join(generator.stream(dialog, temperature=0, max_gen_len=20)) == expected


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_stream_leaves_the_generator_ready(generator, interruption):
    prompt = "Once upon a time"
    expected = list(generator.stream(prompt, temperature=0.8, max_gen_len=20, seed=3))
    with pytest.raises(interruption):
        for i, _ in enumerate(generator.stream("Something else entirely, longer", temperature=0, max_gen_len=20)):
            if i == 2:
                raise interruption()
    assert list(generator.stream(prompt, temperature=0.8, max_gen_len=20, seed=3)) == expected
    abandoned = generator.stream("Abandoned after one piece", temperature=0, max_gen_len=20)
    next(abandoned)
    abandoned.close()
    assert list(generator.stream(prompt, temperature=0.8, max_gen_len=20, seed=3)) == expected


def test_stream_rejects_several_sequences(generator):
    with pytest.raises(ValueError, match="one sequence"):
        next(generator.stream("Hi", n=2))
    with pytest.raises(ValueError, match="temperature"):
        next(generator.stream("Hi", temperature=-1))

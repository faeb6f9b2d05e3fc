"""Constrained decoding (`llama.grammar`): the masks against a brute-force reference over the whole
vocabulary (each token's decoded text tried against the language), and generations, sampled or
greedy, batched with free text or not, that parse and validate with jsonschema (an independent
validator)."""

import json

import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pip install -e '.[grammar]')")
jsonschema = pytest.importorskip("jsonschema", reason="generations are checked with jsonschema")

from llama import Llama  # noqa: E402
from llama.errors import InvalidArgument  # noqa: E402
from llama.grammar import Grammar, logit_masks  # noqa: E402
from llama.processors import SamplingParams  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402

# Nested object, enum, array, required fields; strings and arrays bounded, so that a
# random model sampling at temperature 1 ends its document before the length limit.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
WORDS = ["yes", "yet", "no", "not", "maybe so", "maybe not"]
YES_NO = "start: " + " | ".join(f'"{word}"' for word in WORDS)


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def tokenizer(request, llama3_tokenizer_path):
    if request.param == "llama3":
        return load_tokenizer(llama3_tokenizer_path)
    return load_tokenizer(request.getfixturevalue("bundled_model")[1])


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=160, max_batch_size=4)


def mask(grammar: Grammar, tokenizer, prefix: str):
    """The tokens the grammar allows after `prefix` (fed as the tokenizer encodes it), as a set of ids."""
    state = grammar.start(1)
    for token in tokenizer.encode(prefix, bos=False, eos=False):
        state.advance([token], [True])
    [masks] = logit_masks([(state, [True])], tokenizer.n_words, "cpu")
    assert set(masks[0].unique().tolist()) <= {0.0, float("-inf")}
    return set((masks[0] == 0).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("prefix", ["", "ye", "no", "maybe", "yes", "maybe so"])
def test_mask_is_every_token_that_continues_a_word(tokenizer, prefix):
    """Reference: token t is allowed after `prefix` iff prefix + its text begins one of the words, and
    the stop tokens are allowed iff prefix is a whole word (so after "yes", which nothing can follow,
    they alone are). At each prefix here the words still leave a choice of how to go on."""
    special = set(tokenizer.special_tokens.values())
    expected = {
        t for t in range(tokenizer.n_words)
        if t not in special and (piece := tokenizer.decode([t]))
        and any(word.startswith(prefix + piece) for word in WORDS)
    }
    if prefix in WORDS:
        expected |= set(tokenizer.stop_tokens)
    assert mask(Grammar.lark(YES_NO, tokenizer), tokenizer, prefix) == expected


def test_forced_text_is_tokenized_as_the_tokenizer_does(tokenizer):
    """Where the grammar leaves one way to go on, llguidance allows only the first token of that
    text's own tokenization (not every token that begins it): here the rest of "maybe so"."""
    grammar = Grammar.lark('start: "maybe so"', tokenizer)
    rest = tokenizer.encode("maybe so", bos=False, eos=False)[len(tokenizer.encode("maybe", bos=False, eos=False)):]
    assert mask(grammar, tokenizer, "maybe") == {rest[0]}


def test_json_mask_allows_stop_tokens_only_when_the_document_is_whole(tokenizer):
    grammar = Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                  tokenizer)
    stops = set(tokenizer.stop_tokens)
    for prefix in ["", '{"a": 1', '{"a": 12, "b"']:
        assert not mask(grammar, tokenizer, prefix) & stops
    assert mask(grammar, tokenizer, '{"a": 12}') == stops


def test_schema_generations_parse_and_validate(generator):
    """Sampled at temperature 1 (and greedy, which must not take the unconstrained argmax path),
    a random model's every continuation is a document valid against the schema, ended by a stop token."""
    prompt = generator.tokenizer.encode("Describe a person as JSON:", bos=True, eos=False)
    for temperature, seed in ((1.0, 0), (1.0, 1), (0.0, 0)):
        request = generator.request([prompt], 150, temperature, 1.0, n=4, seed=seed, json_schema=PERSON)
        generator._run(request)
        for seq in request.sequences:
            document = json.loads(generator.tokenizer.decode(seq.result))
            jsonschema.validate(document, PERSON)
            assert seq.stop.cause == "stop token"


def test_chat_completion_with_a_json_schema(generator):
    dialog = [{"role": "user", "content": "Who are you? Answer in JSON."}]
    results = generator.chat_completion([dialog, dialog], temperature=1.0, top_p=1.0, max_gen_len=150, seed=3,
                                        json_schema=PERSON)
    for result in results:
        jsonschema.validate(json.loads(result["generation"]["content"]), PERSON)


def test_a_lark_grammar_ends_the_sequence_where_it_is_complete(generator):
    tokens, _ = generator.generate([[128000, 40]], max_gen_len=20, temperature=1.0, n=4, seed=0, grammar=YES_NO)
    assert all(generator.tokenizer.decode(t) in WORDS for t in tokens)


def test_constrained_and_free_requests_share_steps_unchanged(generator):
    """A constrained request batched with a free one: each decodes what it decodes alone."""
    free_prompt, json_prompt = [128000, 791, 6864, 315], [128000, 40, 1093]

    def run(*requests):
        for request in requests:
            generator.engine.add(request)
        while not all(request.finished for request in requests):
            generator.engine.step()
        return [[seq.result for seq in request.sequences] for request in requests]

    def free():
        return generator.request([free_prompt], 12, temperature=0)

    def constrained():
        return generator.request([json_prompt], 150, temperature=1.0, top_p=1.0, seed=4, n=2, json_schema=PERSON)

    together = run(free(), constrained())
    assert together == run(free()) + run(constrained())


def test_grammars_compare_by_their_text(tokenizer):
    first = SamplingParams.from_options(tokenizer, tokenizer.n_words, json_schema=PERSON)
    again = SamplingParams.from_options(tokenizer, tokenizer.n_words, json_schema=json.loads(json.dumps(PERSON)))
    assert first == again and hash(first) == hash(again)
    assert first != SamplingParams.from_options(tokenizer, tokenizer.n_words, grammar=YES_NO)


@pytest.mark.parametrize("options, name, message", [
    ({"json_schema": {"type": "int"}}, "json_schema", "Invalid type: int"),
    ({"json_schema": "{}"}, "json_schema", "must be a dict"),
    ({"grammar": "start: nothing"}, "grammar", "unknown name"),
    ({"grammar": YES_NO, "json_schema": PERSON}, "grammar", "not both"),
    ({"grammar": YES_NO, "min_gen_len": 2}, "min_gen_len", "grammar decides where the text ends"),
])
def test_bad_grammar_options(generator, options, name, message):
    with pytest.raises(InvalidArgument, match=message) as error:
        generator.generate([[128000, 40]], max_gen_len=4, **options)
    assert error.value.name == name


def test_beam_search_refuses_a_grammar(generator):
    with pytest.raises(InvalidArgument, match="beam search cannot follow a grammar"):
        generator.generate([[128000, 40]], max_gen_len=4, num_beams=2, json_schema=PERSON)

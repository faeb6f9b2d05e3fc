"""Speculative decoding (`llama.engine.speculative`): greedy tokens equal plain decoding's for every
proposer, alone, batched and under continuous batching; sampled tokens follow the model's
distribution (chi-square tests of the acceptance rule and of the whole engine, which a wrong
rule fails); the controls reach both distributions."""

import itertools
import types

import pytest
import torch

from llama import Llama
from llama.engine import Engine, ModelRunner
from llama.engine.speculative import DraftModel, PromptLookup, Speculator, accept
from llama.errors import InvalidArgument
from llama.model import ModelArgs, Transformer
from llama.processors import SamplingParams, next_token_probs

# Chi-square's critical values at a 0.1 % false-alarm rate (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {4: 18.467, 63: 103.442}

PROMPTS = [[128000, 40, 1093, 40, 1093, 40, 1093], [128000, 791, 6864, 315, 9822], [128000, 9906]]


def build(tiny_checkpoints, tokenizer_path, **options):
    return Llama.build(tiny_checkpoints["gqa"], tokenizer_path, max_seq_len=64, max_batch_size=4, **options)


@pytest.fixture(scope="module")
def plain(tiny_checkpoints, llama3_tokenizer_path):
    return build(tiny_checkpoints, llama3_tokenizer_path)


@pytest.fixture(scope="module", params=["prompt-lookup", "int8", "int4", "draft"])
def speculative(request, tiny_checkpoints, llama3_tokenizer_path):
    """A generator of each proposer: the "draft" is another architecture (multi-head attention) with the same vocabulary."""
    if request.param == "draft":
        return build(tiny_checkpoints, llama3_tokenizer_path, draft=tiny_checkpoints["mha"], speculative_tokens=3)
    return build(tiny_checkpoints, llama3_tokenizer_path, speculative=request.param)


def test_greedy_tokens_equal_plain_decoding(plain, speculative):
    expected, _ = plain.generate(PROMPTS, max_gen_len=40, temperature=0)
    assert speculative.generate(PROMPTS, max_gen_len=40, temperature=0)[0] == expected
    assert [speculative.generate([p], max_gen_len=40, temperature=0)[0][0] for p in PROMPTS] == expected
    counters = speculative.engine.counters
    assert counters["speculative_steps"] > 0 and counters["draft_tokens"] > 0


def test_greedy_logprobs_and_stops_equal_plain_decoding(plain, speculative):
    """Log-probabilities of speculated tokens come from the verify pass; a stop string cuts a round's tokens."""
    options = dict(max_gen_len=30, temperature=0, logprobs=True, stop=["Ł"], min_gen_len=3, bad_words=[[1093]])
    tokens, logprobs = plain.generate(PROMPTS, **options)
    spec_tokens, spec_logprobs = speculative.generate(PROMPTS, **options)
    assert spec_tokens == tokens
    for row, spec_row in zip(logprobs, spec_logprobs):
        assert spec_row == pytest.approx(row, abs=1e-4)


def test_continuous_batching_rows_at_different_depths(plain, speculative):
    """Requests joining and leaving a running batch (rows moved, the draft's with them), each
    speculating to its own depth: each decodes what it decodes alone without speculation."""
    lengths = [25, 8, 30, 12, 20]
    prompts = [PROMPTS[i % 3] + [100 + i] for i in range(len(lengths))]
    expected = [plain.generate([p], max_gen_len=n, temperature=0)[0][0] for p, n in zip(prompts, lengths)]
    engine = speculative.engine
    requests = [speculative.request([p], n, temperature=0) for p, n in zip(prompts, lengths)]
    pending = list(requests)
    for step in itertools.count():
        if pending and step % 3 == 0:  # a newcomer every third step
            engine.add(pending.pop(0))
        if not pending and not engine.has_work:
            break
        engine.step()
    assert [r.sequences[0].result for r in requests] == expected


def test_compiled_drafts_give_the_same_tokens(plain, tiny_checkpoints, llama3_tokenizer_path):
    """compile=True compiles the draft's decode step too (the verify pass is eager, as prefill is)."""
    compiled = build(tiny_checkpoints, llama3_tokenizer_path, compile=True, speculative="int8")
    expected, _ = plain.generate(PROMPTS, max_gen_len=20, temperature=0)
    assert compiled.generate(PROMPTS, max_gen_len=20, temperature=0)[0] == expected
    assert compiled.engine.counters["accepted_tokens"] > 0


@pytest.mark.parametrize("proposer", ["prompt-lookup", "int8"])
def test_bundled_model_greedy_tokens_equal_plain_decoding(bundled_model, proposer):
    """The real SmolLM2 (where drafts are mostly right): speculation changes no greedy token, batched or alone."""
    ckpt_dir, tokenizer_path = bundled_model
    options = dict(max_seq_len=256, max_batch_size=2)
    plain_model = Llama.build(ckpt_dir, tokenizer_path, **options)
    dialogs = [[{"role": "user", "content": "Repeat after me: the quick brown fox jumps over the lazy dog."}],
               [{"role": "user", "content": "Describe the water cycle."}]]
    prompts = [plain_model.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
    expected, _ = plain_model.generate(prompts, max_gen_len=24, temperature=0)
    del plain_model
    fast = Llama.build(ckpt_dir, tokenizer_path, speculative=proposer, **options)
    assert fast.generate(prompts, max_gen_len=24, temperature=0)[0] == expected
    assert [fast.generate([p], max_gen_len=24, temperature=0)[0][0] for p in prompts] == expected
    assert fast.engine.counters["accepted_tokens"] > 0


def test_opting_out_per_call(speculative):
    before = speculative.engine.counters["draft_tokens"]
    speculative.generate(PROMPTS, max_gen_len=10, temperature=0, speculative=False)
    assert speculative.engine.counters["draft_tokens"] == before


def test_sampled_tokens_keep_to_the_controls(plain, speculative):
    """Under top-k 2 and a repetition penalty, every speculated token is one of the two the model
    (with the penalty, given the tokens before it) ranks highest: the controls shape p at every position."""
    prompt = PROMPTS[0]
    tokens, _ = speculative.generate([prompt], max_gen_len=30, temperature=1.0, top_p=1.0, top_k=2,
                                     repetition_penalty=1.3, seed=0)
    params = plain.sampling_params(1.0, 1.0, top_k=2, repetition_penalty=1.3)
    context = list(prompt)
    for token in tokens[0]:
        logits = plain.model(torch.tensor([context]), 0)[:, -1]  # (1, V), a fresh pass each time
        generated = torch.tensor([context[len(prompt):]], dtype=torch.long)
        p = next_token_probs(logits, generated, params, torch.tensor([prompt]))
        assert p[0, token] > 0
        context.append(token)


def test_grammar_requests_do_not_speculate(speculative):
    pytest.importorskip("llguidance")
    before = speculative.engine.counters["draft_tokens"]
    tokens, _ = speculative.generate([PROMPTS[0]], max_gen_len=10, temperature=0, grammar='start: "yes" | "no"')
    assert speculative.tokenizer.decode(tokens[0]) in ("yes", "no")
    assert speculative.engine.counters["draft_tokens"] == before


@pytest.mark.parametrize("options, name", [
    ({"speculative": "int2"}, "speculative"),
    ({"speculative": "draft"}, "draft"),
    ({"speculative": "int4", "draft": "x"}, "speculative"),
    ({"speculative": "prompt-lookup", "speculative_tokens": 0}, "speculative_tokens"),
])
def test_bad_speculative_options(tiny_checkpoints, llama3_tokenizer_path, options, name):
    with pytest.raises(InvalidArgument) as error:
        build(tiny_checkpoints, llama3_tokenizer_path, **options)
    assert error.value.name == name


def test_self_draft_needs_float_weights(tiny_checkpoints, llama3_tokenizer_path):
    with pytest.raises(ValueError, match="float checkpoint"):
        build(tiny_checkpoints, llama3_tokenizer_path, quantize="int8", speculative="int4")


def test_prompt_lookup_takes_the_latest_match():
    lookup = PromptLookup(k=3)
    assert lookup.lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the latest 3-gram match
    assert lookup.lookup([5, 6, 1, 2, 4, 2], 2) == [4, 2]  # no 2-gram match: the last 1-gram's
    assert lookup.lookup([1, 2, 3], 3) == []


# --- The acceptance rule, alone ------------------------------------------------------------------


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def rule_draws(p: torch.Tensor, q: torch.Tensor, draws: int, point_mass: bool, seed: int = 0) -> torch.Tensor:
    """The first token the rule emits in `draws` independent rounds of one draft token drawn from q."""
    generator = torch.Generator().manual_seed(seed)
    V = p.numel()
    drafts = torch.multinomial(q.expand(draws, V), 1, replacement=True, generator=generator)  # (draws, 1)
    target = p.expand(draws, 2, V).contiguous()  # the model's distributions at both positions
    proposal = None if point_mass else q.expand(draws, 1, V).contiguous()
    kept, after = accept(target, proposal, drafts, torch.ones(draws, dtype=torch.long), greedy=False,
                         generator=generator)
    return torch.where(kept > 0, drafts[:, 0], after)


P = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])
Q = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35])  # a poor draft: most of its mass where p has little


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft-model", "lookup"])
def test_the_rule_emits_the_models_distribution(point_mass):
    """20,000 rounds: the emitted token follows p (chi-square below the 0.1 % critical value),
    for a drawn draft (q) and for a guess treated as a point mass (prompt lookup's)."""
    samples = rule_draws(P, Q, 20_000, point_mass)
    assert chi_square(samples, P) < CHI2_999[4]
    assert chi_square(samples, Q) > 1000  # and not q's


@pytest.mark.parametrize("wrong", ["resample-from-p", "always-accept"])
def test_a_wrong_rule_fails_the_test(monkeypatch, wrong):
    """The same check catches the usual mistakes: drawing a refused draft's replacement from p
    instead of max(p - q, 0) (too much mass on q's tokens), or keeping every draft (q itself)."""
    import llama.engine.speculative as speculative

    if wrong == "resample-from-p":
        monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    else:
        monkeypatch.setattr(speculative.torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    samples = rule_draws(P, Q, 20_000, point_mass=False)
    assert chi_square(samples, P) > CHI2_999[4]


# --- The whole engine on a tiny vocabulary -------------------------------------------------------


ROWS = 40  # sequences per request in the engine test


def tiny_vocab_model(seed: int, dim: int) -> Transformer:
    args = ModelArgs(dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=4, multiple_of=16, max_seq_len=8,
                     max_batch_size=ROWS)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.7)
    model.setup_caches(args.max_batch_size, args.max_seq_len)  # the rotary table, after normal_ overwrote nothing of it
    return model


def engine_triples(target: Transformer, draft: Transformer, n_requests: int, seed: int = 0) -> torch.Tensor:
    """The first three tokens of ROWS * n_requests sequences after the prompt [1, 2], as indices 16 a + 4 b + c:
    the first from the prefill, the next two from speculative rounds (two drafts, then one if needed)."""
    tokenizer = types.SimpleNamespace(stop_tokens=[])  # no stop token: every sequence runs to its limit
    engine = Engine(ModelRunner(target, draft=draft), tokenizer, speculator=Speculator(DraftModel(k=3)))
    params = SamplingParams(temperature=1.0, top_p=1.0)
    generator = torch.Generator().manual_seed(seed)
    triples = []
    for _ in range(n_requests):
        request = engine.request([[1, 2]] * ROWS, params, 4, generator=generator)
        engine.add(request)
        while not request.finished:
            engine.step()
        triples += [16 * seq.result[0] + 4 * seq.result[1] + seq.result[2] for seq in request.sequences]
    assert engine.counters["draft_tokens"] >= 2 * ROWS * n_requests  # a round of two drafts per row, at least
    return torch.tensor(triples)


def exact_triple_probs(model: Transformer) -> torch.Tensor:
    """p(a, b, c | [1, 2]) for the 64 triples, from fresh forward passes."""
    with torch.inference_mode():
        first = torch.softmax(model(torch.tensor([[1, 2]]), 0)[0, -1], -1)  # (4,)
        second = torch.softmax(model(torch.tensor([[1, 2, a] for a in range(4)]), 0)[:, -1], -1)  # (4, 4)
        third = torch.softmax(model(torch.tensor([[1, 2, a, b] for a in range(4) for b in range(4)]), 0)[:, -1], -1)
    return (first[:, None, None] * second[:, :, None] * third.view(4, 4, 4)).reshape(-1)


def test_the_engine_samples_the_models_joint_distribution(monkeypatch):
    """20,000 sequences through draft, verify and acceptance (two drafts after the first token, the
    draft's cache caught up first): their first three tokens follow the model's joint distribution;
    with replacements drawn from p instead of max(p - q, 0), they do not."""
    import llama.engine.speculative as speculative

    target, draft = tiny_vocab_model(0, 32), tiny_vocab_model(1, 16)
    exact = exact_triple_probs(target)
    assert (exact - exact_triple_probs(draft)).abs().sum() > 0.3  # the draft is a poor one
    assert chi_square(engine_triples(target, draft, 500), exact) < CHI2_999[63]
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    assert chi_square(engine_triples(target, draft, 500), exact) > CHI2_999[63]

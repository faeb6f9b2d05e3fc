"""Choosing the next token: logits processors, then greedy choice or sampling.

Each processor is a small pure function on fp32 logits (B, V) that returns new
logits and leaves its input alone. `next_token` applies them in transformers'
order (which has no presence/frequency penalties: they sit by the other penalty),
after OpenAI's logit_bias, which is added to the model's logits first:

    0. add_logit_bias               a fixed bias per token id (OpenAI's logit_bias)
    1. repetition_penalty           tokens of the prompt and of the generation (CTRL)
    2. presence_frequency_penalty   tokens of the generation only (OpenAI)
    3. ban_bad_words                banned token sequences
    4. min_new_tokens               stop tokens forbidden until min_gen_len tokens exist
    5. add_grammar_mask             -inf on what a grammar forbids next (`llama.grammar`), from the sampler
       -> temperature == 0: the most likely token (greedy); otherwise:
    6. temperature_scale
    7. top_k
    8. top_p, min_p                 on the sorted probabilities, in `sample_top_p`
    9. one draw from what is left

Every control is off at its default, and an off processor returns its input,
so the defaults draw exactly what the reference draws:
`sample_top_p(torch.softmax(logits / temperature, -1), top_p, generator)`.
Top-p and min-p live in that sampler, on its sorted probabilities, rather
than as logits masks: the same sort, masks and draw keep the reference's
tokens for a given generator state, bit for bit.

Shapes: B rows, V vocabulary ids, t tokens generated so far, L prompt length.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, Union

import torch

from llama.errors import InvalidArgument

if TYPE_CHECKING:
    from llama.grammar import Grammar


@dataclass(frozen=True)
class SamplingParams:
    """Every control of how the next token is chosen; validated when built.

    Defaults are the reference's temperature and top_p with everything else off.
    """

    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    min_gen_len: int = 0  # stop tokens are forbidden until this many tokens are generated
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # 0: off
    frequency_penalty: float = 0.0  # 0: off
    bad_words: Tuple[Tuple[int, ...], ...] = ()  # token-id sequences never generated
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    stop_tokens: Tuple[int, ...] = ()  # for min_gen_len
    grammar: Optional["Grammar"] = None  # the text must match it (`llama.grammar`); None: free text

    def __post_init__(self):
        # Freeze lists into tuples, so params are hashable and cannot change behind the loop's back.
        try:
            object.__setattr__(self, "bad_words", tuple(tuple(word) for word in self.bad_words))
        except TypeError as e:
            raise InvalidArgument("bad_words", f"bad_words must be a list of token-id lists: {e}") from e
        try:
            bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
            object.__setattr__(self, "logit_bias", tuple(sorted((token, bias) for token, bias in bias)))
        except (TypeError, ValueError) as e:
            raise InvalidArgument("logit_bias", f"logit_bias must map token ids to biases: {e}") from e
        try:
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
        except TypeError as e:
            raise InvalidArgument("stop_tokens", f"stop_tokens must be a list of token ids: {e}") from e
        self.validate()

    @classmethod
    def from_options(
        cls, tokenizer, vocab_size: int, temperature: float = 0.6, top_p: float = 0.9, *, top_k: int = 0,
        min_p: float = 0.0, min_gen_len: int = 0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0, bad_words: Optional[Sequence[Union[str, Sequence[int]]]] = None,
        logit_bias: Optional[Dict[int, float]] = None, json_schema: Optional[dict] = None,
        grammar: Optional[Union[str, "Grammar"]] = None,
    ) -> "SamplingParams":
        """The validated controls from user options (`Llama.generate`'s keywords).

        bad_words: words never generated: token-id lists, or strings, banned as tokenized
        alone and after a space; a single string is one word.
        logit_bias: {token id: bias in [-100, 100]} added to the model's logits (OpenAI's).
        json_schema: the text is a JSON document valid against this schema (a dict).
        grammar: the text is a sentence of this grammar: a Lark grammar in llguidance's
            dialect (a str) or a `llama.grammar.Grammar`. Not with json_schema.

        Raises:
            InvalidArgument: a control is outside its range (`.name` says which).
        """
        if isinstance(bad_words, str):
            bad_words = [bad_words]
        words = []
        for word in bad_words or []:
            if isinstance(word, str):
                words.append(tokenizer.encode(word, bos=False, eos=False))
                words.append(tokenizer.encode(" " + word, bos=False, eos=False))
            elif isinstance(word, (list, tuple)):
                words.append(list(word))
            else:
                raise InvalidArgument(
                    "bad_words", f"bad_words must hold strings or token-id lists, got {type(word).__name__} {word!r}"
                )
        for word in words:
            if any(not _is_int(t) or not 0 <= t < vocab_size for t in word):
                raise InvalidArgument(
                    "bad_words", f"bad_words: {word} holds token ids outside the vocabulary [0, {vocab_size})"
                )
        for token in (logit_bias or {}):
            if not _is_int(token) or not 0 <= token < vocab_size:
                raise InvalidArgument(
                    "logit_bias", f"logit_bias: {token!r} is not a token id of the vocabulary [0, {vocab_size})"
                )
        return cls(
            logit_bias=logit_bias or (), temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            min_gen_len=min_gen_len,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, bad_words=list(dict.fromkeys(map(tuple, words))),
            stop_tokens=tokenizer.stop_tokens, grammar=_grammar(tokenizer, json_schema, grammar),
        )

    def validate(self) -> "SamplingParams":
        """Raises InvalidArgument naming the first control outside its allowed range; returns self."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise InvalidArgument(name, f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not self.temperature >= 0:
            raise InvalidArgument("temperature", f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgument("top_k", f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise InvalidArgument("min_p", f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        if not _is_int(self.min_gen_len) or self.min_gen_len < 0:
            raise InvalidArgument("min_gen_len", f"min_gen_len must be an integer >= 0, got {self.min_gen_len!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InvalidArgument(
                "repetition_penalty", f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidArgument(name, f"{name} must be in [-2, 2] (0 turns it off), got {value}")
        for word in self.bad_words:
            if len(word) == 0 or not all(_is_int(t) and t >= 0 for t in word):
                raise InvalidArgument("bad_words", f"bad_words must be non-empty lists of token ids >= 0, got {list(word)}")
        for token, bias in self.logit_bias:
            if not _is_int(token) or token < 0 or not _is_number(bias) or not -100 <= bias <= 100:
                raise InvalidArgument(
                    "logit_bias", f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {token!r}: {bias!r}"
                )
        if not all(_is_int(t) and t >= 0 for t in self.stop_tokens):
            raise InvalidArgument("stop_tokens", f"stop_tokens must be token ids >= 0, got {list(self.stop_tokens)}")
        if self.grammar is not None and self.min_gen_len > 0:
            raise InvalidArgument("min_gen_len", "min_gen_len cannot be combined with a grammar or json_schema: the "
                                                 "grammar decides where the text ends")
        return self


def _grammar(tokenizer, json_schema, grammar) -> Optional["Grammar"]:
    """The grammar the json_schema or grammar option asks for, compiled for the tokenizer; None for neither."""
    if json_schema is None and grammar is None:
        return None
    if json_schema is not None and grammar is not None:
        raise InvalidArgument("grammar", "pass json_schema or grammar, not both")
    from llama.grammar import Grammar  # an optional feature, imported on use

    if isinstance(grammar, Grammar):
        return grammar
    name = "json_schema" if json_schema is not None else "grammar"
    try:
        if json_schema is not None:
            return Grammar.json_schema(json_schema, tokenizer)
        return Grammar.lark(grammar, tokenizer)
    except ValueError as e:
        raise InvalidArgument(name, f"{name}: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --- Helpers -------------------------------------------------------------------------------------


def pad_prompts(prompt_tokens: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Prompts as one (B, L) tensor, left-padded with -1: row b's last prompt token sits in column L - 1,
    so `torch.cat([prompts, generated], 1)` keeps each row's tokens contiguous up to its end."""
    length = max(len(p) for p in prompt_tokens)
    padded = torch.full((len(prompt_tokens), length), -1, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompt_tokens):
        padded[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
    return padded


def token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) fp32: how often each id occurs in each row of tokens (B, t); -1 (padding) is not counted."""
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, device=tokens.device)
    ids = torch.where(tokens < 0, vocab_size, tokens)  # padding lands in a spare last column
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


# --- Processors: (B, V) logits -> (B, V) logits, in pipeline order ---------------------------------


def add_logit_bias(logits: torch.Tensor, bias: Sequence[Tuple[int, float]]) -> torch.Tensor:
    """Each (token id, bias) pair's bias added to that token's logit in every row."""
    if not bias:
        return logits
    ids = torch.tensor([token for token, _ in bias], device=logits.device)
    values = torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already in context (B, L + t) get positive logits divided by penalty and negative ones multiplied."""
    if penalty == 1.0:
        return logits
    seen = token_counts(context, logits.shape[-1]) > 0  # (B, V)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def presence_frequency_penalty(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: subtract frequency * count + presence * (count > 0) over generated tokens (B, t)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = token_counts(generated, logits.shape[-1])  # (B, V)
    return logits - frequency * counts - presence * (counts > 0).float()


def ban_bad_words(logits: torch.Tensor, context: torch.Tensor, bad_words: Sequence[Sequence[int]]) -> torch.Tensor:
    """-inf on each word's last token where context (B, L + t) ends with the word's other tokens (always for one)."""
    if not bad_words:
        return logits
    banned = torch.zeros_like(logits, dtype=torch.bool)  # (B, V)
    for *prefix, last in bad_words:
        if len(prefix) > context.shape[1]:
            continue  # the context is too short to hold the prefix
        tail = context[:, context.shape[1] - len(prefix) :]  # (B, len(prefix))
        prefix_ids = torch.tensor(prefix, dtype=torch.long, device=context.device)
        banned[:, last] |= (tail == prefix_ids).all(dim=1)  # an empty prefix always matches
    return logits.masked_fill(banned, -math.inf)


def min_new_tokens(logits: torch.Tensor, n_generated: int, min_gen_len: int, stop_tokens: Sequence[int]):
    """-inf on the stop tokens while fewer than min_gen_len tokens have been generated."""
    if n_generated >= min_gen_len or not stop_tokens:
        return logits
    logits = logits.clone()
    logits[:, list(stop_tokens)] = -math.inf
    return logits


def add_grammar_mask(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """logits + a grammar's mask (B, V): 0 on the tokens it allows next, -inf on the others; None: no grammar."""
    if mask is None:
        return logits
    return logits + mask


def temperature_scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by the temperature (> 0): below 1 sharpens, above 1 flattens."""
    return logits / temperature


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf on every token less likely than the k-th most likely of its row (ties with it are kept)."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_mask(probs_sort: torch.Tensor, p: float) -> torch.Tensor:
    """On probabilities sorted descending (B, V): True for tokens entirely beyond the nucleus of mass p."""
    return torch.cumsum(probs_sort, dim=-1) - probs_sort > p


def min_p_mask(probs_sort: torch.Tensor, min_p: float) -> torch.Tensor:
    """On probabilities sorted descending (B, V): True for tokens less likely than min_p times the top one."""
    return probs_sort < min_p * probs_sort[:, :1]


# --- Sampling ------------------------------------------------------------------------------------


def sample_top_p(
    probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None, min_p: float = 0.0
) -> torch.Tensor:
    """Nucleus sampling: draws from the smallest set of most likely tokens whose
    probabilities sum to at least p.

    Args:
        probs: (B, V) probability distributions.
        p: the cumulative probability kept.
        generator: the random generator to draw from (torch's global one if None).
        min_p: also drop tokens less likely than min_p times the most likely
            one (0, the default, drops none). Like transformers, the nucleus is
            taken first, on probs as given.

    Returns:
        (B, 1) sampled token ids.
    """
    probs_sort, probs_idx = _nucleus_sorted(probs, p, min_p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def _nucleus_sorted(probs: torch.Tensor, p: float, min_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the nucleus's probabilities, renormalized, sorted descending (B, V) with 0 past it; their token ids)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mask = top_p_mask(probs_sort, p)
    if min_p > 0:
        mask |= min_p_mask(probs_sort, min_p)
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def apply_processors(
    logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams, prompt: Optional[torch.Tensor] = None,
    grammar_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Steps 0-5 (bias, penalties, bans, minimum length, grammar): those that also apply to greedy
    (and, but the grammar, to beam search)."""
    logits = add_logit_bias(logits, params.logit_bias)
    context = generated  # (B, t), or (B, L + t) with the prompt, for the processors that read it
    if prompt is not None and (params.repetition_penalty != 1.0 or params.bad_words):
        context = torch.cat([prompt, generated], dim=1)
    logits = repetition_penalty(logits, context, params.repetition_penalty)
    logits = presence_frequency_penalty(logits, generated, params.presence_penalty, params.frequency_penalty)
    logits = ban_bad_words(logits, context, params.bad_words)
    logits = min_new_tokens(logits, generated.shape[1], params.min_gen_len, params.stop_tokens)
    return add_grammar_mask(logits, grammar_mask)


def next_token(
    logits: torch.Tensor,
    generated: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    prompt: Optional[torch.Tensor] = None,
    grammar_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each row's next token (B,) from its logits (B, V), in the order of this module's docstring.

    Args:
        logits: fp32 logits of each row's last position.
        generated: (B, t) tokens generated so far (t may be 0).
        params: the controls.
        generator: the random generator to draw from (torch's global one if None).
        prompt: (B, L) prompt tokens left-padded with -1 (`pad_prompts`), for the
            repetition penalty and bad words that start in the prompt; None: the
            generated tokens alone are the context.
        grammar_mask: (B, V), 0 on the tokens a grammar allows next, -inf elsewhere (`llama.grammar.logit_masks`).
    """
    logits = apply_processors(logits, generated, params, prompt, grammar_mask)
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = top_k(temperature_scale(logits, params.temperature), params.top_k)
    probs = torch.softmax(logits, dim=-1)
    return sample_top_p(probs, params.top_p, generator, min_p=params.min_p).reshape(-1)


def next_token_probs(
    logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams, prompt: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The distribution (B, V) that `next_token` draws each row's token from, in vocabulary order:
    after steps 0-4, the temperature, top-k and the nucleus (top-p, min-p), renormalized; for
    greedy, 1 on the argmax. Speculative decoding (`llama.engine.speculative`) compares a draft's
    and the model's. Arguments as `next_token`'s (no grammar: it turns speculation off)."""
    logits = apply_processors(logits, generated, params, prompt)
    if params.temperature == 0:
        return torch.nn.functional.one_hot(torch.argmax(logits, dim=-1), logits.shape[-1]).float()
    logits = top_k(temperature_scale(logits, params.temperature), params.top_k)
    probs_sort, probs_idx = _nucleus_sorted(torch.softmax(logits, dim=-1), params.top_p, params.min_p)
    return torch.zeros_like(probs_sort).scatter_(-1, probs_idx, probs_sort)


def uses_context(params: SamplingParams, generated: int) -> bool:
    """Whether the processors read the tokens so far (penalties, bad words, min_gen_len still
    applying after `generated` tokens): if not, rows at any depth share one distribution rule."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or bool(params.bad_words) or generated < params.min_gen_len)

"""Constrained decoding: the generated text must match a grammar, enforced token by token.

A `Grammar` is a JSON schema (`Grammar.json_schema`) or a grammar in llguidance's Lark
dialect (`Grammar.lark`, https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md),
compiled for one tokenizer. Each constrained row of a request has a matcher
(`GrammarState`); before each token the sampler asks every matcher of the step, in one
call (`logit_masks`), which tokens keep its row's text a prefix of something the
grammar accepts, and the others get -inf (`llama.processors.add_grammar_mask`); after the draw
each matcher takes its row's token. The stop tokens are allowed only where the grammar is
complete, and once it can go no further they are the only tokens allowed: the engine's
stop check ends the sequence there.

The engine is llguidance (`pip install llguidance`, the `grammar` extra), chosen by
`python -m bench.grammar_mask` on our two tokenizers against xgrammar and outlines-core
(the README has the figures): xgrammar fills a mask 3 to 5 times faster, but compiles a
schema 7 to 20 times slower (tens of milliseconds, paid by every request with a new schema
or new tools), and needs torch, transformers and triton; outlines-core takes seconds to
tens of seconds per schema. Either mask costs well under a millisecond per token at batch 1,
little beside a forward pass. llguidance also has no Python dependencies, and its Lark
grammars can require a special token (Llama 3's <|python_tag|> before a forced call).

JSON is written without optional white space, with ", " and ": " between items (as
`json.dumps` writes it): at temperature 1, white space a schema allows anywhere could
otherwise run on to the length limit. A schema's own "x-guidance" options override this.

Shapes: R rows constrained in a step, V vocabulary, W = ceil(V / 32) words of a bit mask.
"""

import json
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

import torch

try:
    import llguidance
except ImportError as e:  # an optional feature: say how to get it
    raise ImportError(f"structured outputs need llguidance ({e}): pip install 'llama[grammar]'") from e

logger = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict) -> str:
    """A Lark expression for the JSON documents valid against `schema`, written as `Grammar.json_schema` writes them."""
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}})


# --- The tokenizer as llguidance sees it ----------------------------------------------------------


class _Vocabulary:
    """The interface `llguidance.TokenizerWrapper` reads: every token's bytes (special tokens marked
    with a leading 0xFF, which llguidance never matches against text), the stop tokens, an encoder."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = set(tokenizer.special_tokens.values())
        self.tokens = [b"\xff" + piece if i in special else piece for i, piece in enumerate(token_bytes(tokenizer))]
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.stop_tokens[0]
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)


def token_bytes(tokenizer) -> List[bytes]:
    """The bytes of every token id 0..n_words-1 (a special token's: its name), for our two tokenizer kinds."""
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is None:  # tiktoken (llama.tokenizer.Tokenizer)
        return [tokenizer.model.decode_single_token_bytes(i) for i in range(tokenizer.n_words)]
    pieces = []  # SentencePiece: "▁" is a space, <0x0A> is the byte 0x0A
    for i in range(tokenizer.n_words):
        piece = sp_model.id_to_piece(i)
        pieces.append(bytes([int(piece[3:5], 16)]) if sp_model.is_byte(i) else piece.replace("\u2581", " ").encode())
    return pieces


_LLTOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _lltokenizer(tokenizer) -> "llguidance.LLTokenizer":
    """llguidance's tokenizer for ours, built once per tokenizer (about a second for 128k tokens)."""
    if tokenizer not in _LLTOKENIZERS:
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
        _LLTOKENIZERS[tokenizer] = llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.n_words,
                                                          eos_token=list(tokenizer.stop_tokens))
    return _LLTOKENIZERS[tokenizer]


# --- Grammars --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grammar:
    """A grammar compiled for one tokenizer; two are equal when their text is (so `SamplingParams` stay
    comparable and hashable).

    Attributes:
        text: llguidance's serialized grammar.
        description: what it was made from, for messages ("a JSON schema", "a Lark grammar").
    """

    text: str
    description: str
    tokenizer: "llguidance.LLTokenizer" = field(compare=False, repr=False)

    @classmethod
    def json_schema(cls, schema: dict, tokenizer) -> "Grammar":
        """The JSON documents valid against `schema` (a dict, as `json.loads` gives it).

        Raises:
            ValueError: the schema is not a dict, or holds what llguidance cannot enforce
                (its message names the keyword).
        """
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be a dict (a JSON object), got {type(schema).__name__} {schema!r}")
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:  # not JSON-serializable
            raise ValueError(f"the JSON schema cannot be read: {e}") from None
        return cls._checked(text, "a JSON schema", tokenizer)

    @classmethod
    def lark(cls, grammar: str, tokenizer) -> "Grammar":
        """The texts a Lark grammar (llguidance's dialect: `start` is the top rule, `%json {...}`
        embeds a JSON schema, `<|name|>` matches a special token) derives.

        Raises:
            ValueError: the grammar does not compile (the message says where).
        """
        if not isinstance(grammar, str):
            raise ValueError(f"a Lark grammar must be a str, got {type(grammar).__name__}")
        return cls._checked(llguidance.LLMatcher.grammar_from_lark(grammar), "a Lark grammar", tokenizer)

    @classmethod
    def _checked(cls, text: str, description: str, tokenizer) -> "Grammar":
        lltokenizer = _lltokenizer(tokenizer)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lltokenizer)
        if is_error:
            raise ValueError(f"{description} that constrained decoding cannot enforce: {messages[0]}")
        for message in messages:
            logger.warning("%s: %s", description, message)
        return cls(text, description, lltokenizer)

    def start(self, rows: int) -> "GrammarState":
        """Fresh matchers for `rows` rows, at the start of the text."""
        return GrammarState(self, rows)


class GrammarState:
    """One request's matchers, one per row, each fed its row's tokens."""

    def __init__(self, grammar: Grammar, rows: int):
        self.grammar = grammar
        self.matchers = [llguidance.LLMatcher(grammar.tokenizer, grammar.text, log_level=0) for _ in range(rows)]
        for matcher in self.matchers:
            if matcher.is_error():  # the grammar was validated: an invariant
                raise RuntimeError(f"llguidance refused {grammar.description}: {matcher.get_error()}")

    def advance(self, tokens: Sequence[int], active: Sequence[bool]) -> None:
        """Each active row's matcher takes the row's new token (rows whose sequence ended are left alone)."""
        for matcher, token, on in zip(self.matchers, tokens, active):
            if on and not matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: "
                                   f"{matcher.get_error()}")


_EXECUTOR = None  # llguidance's thread pool, made on first use


def logit_masks(states: Sequence[Tuple[GrammarState, Sequence[bool]]], vocab_size: int,
                device: Union[str, torch.device]) -> List[torch.Tensor]:
    """Each state's (k, V) fp32 mask, to add to its rows' logits: 0 for the tokens a row may take
    next, -inf for the others (0 everywhere for rows that are not active). Computed for all the
    states' rows in one parallel call.

    Args:
        states: (a request's matchers, which of its rows are still generating).
        vocab_size: V, the logits' width (the tokenizer's n_words).
        device: where the masks go (the logits' device).
    """
    rows = sum(len(state.matchers) for state, _ in states)
    bitmask = torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)  # (R, W): all allowed
    fill_bitmask(states, bitmask)
    masks = unpack_bitmask(bitmask, vocab_size, device)  # (R, V)
    return list(torch.split(masks, [len(state.matchers) for state, _ in states]))


def fill_bitmask(states: Sequence[Tuple[GrammarState, Sequence[bool]]], bitmask: torch.Tensor) -> None:
    """Writes the masks of the states' active rows into their rows of bitmask (R, W) int32 (on the CPU,
    contiguous), the states' rows one after the other: bit j of word w allows token 32 w + j."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    pairs, row = [], 0
    for state, active in states:
        for matcher, on in zip(state.matchers, active):
            if on:
                pairs.append((matcher, row))
            row += 1
    if pairs:
        _EXECUTOR.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


# Row b: the masks of the 8 tokens whose bits byte value b holds, lowest bit first (0 or -inf).
_BYTE_MASKS = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, -math.inf)  # (256, 8)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: Union[str, torch.device]) -> torch.Tensor:
    """Logit masks (R, V) fp32 on `device`, 0 where bit masks (R, W) int32 allow a token, else -inf.

    One table lookup per byte, and the caller adds the mask: on CPUs several times faster than
    testing bits and masked_fill with -inf (whose fill is the slow part).
    """
    rows = bitmask.shape[0]
    as_bytes = bitmask.to(device).view(torch.uint8).reshape(-1)  # (4 R W,) little-endian: byte b, tokens 8b..8b+7
    masks = _BYTE_MASKS.to(device).index_select(0, as_bytes.long())  # (4 R W, 8)
    return masks.reshape(rows, -1)[:, :vocab_size]

"""Byte-level BPE tokenizers served by tiktoken: Llama 3's (256 special tokens) and
GPT-2-style vocabularies of converted models; `load_tokenizer` picks the right one for a file."""

import base64
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Optional, Sequence, Union

import tiktoken

# Kept importable from here, as in the reference (`from llama.tokenizer import ChatFormat, Dialog`).
from llama.chat_format import ChatFormat, Dialog, Message, Role  # noqa: F401

logger = logging.getLogger(__name__)

# tiktoken panics on inputs over ~400k characters, and on runs of more than
# ~25k consecutive whitespace or non-whitespace characters
# (https://github.com/openai/tiktoken/issues/195): split such inputs first.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

# Llama 3's pre-tokenizer: contractions, words, numbers of up to 3 digits,
# punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named control tokens, at ids 128000.. in this order. Llama 3.0 called ids
# 128004/128005/128008/128010/128011 reserved_special_token_2..6; Llama 3.1
# gave them these names. Same ids, so 3.0 and 3.1 checkpoints both work.
LLAMA3_CONTROL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model expects a tool result next
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
NUM_RESERVED_SPECIAL_TOKENS = 256

AllowedSpecial = Union[Literal["all"], AbstractSet[str]]
DisallowedSpecial = Union[Literal["all"], Collection[str]]


def load_tiktoken_ranks(path: Union[str, Path]) -> Dict[bytes, int]:
    """Reads a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{line_number} is not a tiktoken BPE file line ('<base64 token> <rank>'): {line[:80]!r}"
                ) from e
    return ranks


@dataclass
class TokenizerConfig:
    """What a BPE vocabulary needs beyond its ranks: written as `tokenizer_config.json`
    next to `tokenizer.model` by `llama.convert`; Meta's Llama 3 directories have none."""

    pattern: str
    special_tokens: Dict[str, int]
    bos_token: str
    eos_token: str
    pad_token: str
    stop_tokens: List[str]
    add_bos: bool = True  # does `encode(..., bos=True)` prepend bos_token (SmolLM2 uses none)
    chat_format: str = "llama3"
    default_system_prompt: Optional[str] = None  # used by chat formats that insert one

    KIND = "tiktoken"

    @classmethod
    def llama3(cls, num_base_tokens: int) -> "TokenizerConfig":
        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_CONTROL_TOKENS))
        ]
        special = LLAMA3_CONTROL_TOKENS + reserved
        return cls(
            pattern=LLAMA3_PATTERN,
            special_tokens={token: num_base_tokens + i for i, token in enumerate(special)},
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            pad_token="<|finetune_right_pad_id|>",
            stop_tokens=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        )

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps({"kind": self.KIND, **dataclasses.asdict(self)}, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TokenizerConfig":
        data = json.loads(Path(path).read_text())
        data.pop("kind")
        return cls(**data)


class Tokenizer:
    """Encodes text to token ids and back: byte-level BPE served by tiktoken.

    With Meta's `tokenizer.model` alone this is Llama 3's tokenizer. A
    converted checkpoint's `tokenizer_config.json` beside the file supplies
    another vocabulary's pattern and special tokens (SmolLM2, Llama 3 from
    Hugging Face, ...).

    Attributes:
        n_words: vocabulary size, special tokens included (128256 for Llama 3).
        bos_id, eos_id, pad_id: beginning/end of text and padding ids.
        stop_tokens: ids that end a generation (Llama 3: end of text, end of turn, end of message).
        special_tokens: name -> id of every special token.
        chat_format: name of the model's chat format ("llama3", "chatml", ...).
    """

    def __init__(self, model_path: Union[str, Path], config: Optional[TokenizerConfig] = None):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        mergeable_ranks = load_tiktoken_ranks(model_path)
        if config is None:
            config = TokenizerConfig.llama3(len(mergeable_ranks))
        self.config = config
        self.special_tokens = dict(config.special_tokens)
        self.n_words: int = len(mergeable_ranks) + len(self.special_tokens)
        # GPT-2-style vocabularies may lack bytes that never occur in their training
        # data (control characters, bytes invalid in UTF-8); tiktoken needs every byte.
        # Give those placeholder ids past the vocabulary and drop them from the
        # output, as Hugging Face's BPE drops bytes it has no token for.
        self._first_placeholder_id = max([*mergeable_ranks.values(), *self.special_tokens.values()]) + 1
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in mergeable_ranks]
        ranks = {**mergeable_ranks, **{b: self._first_placeholder_id + i for i, b in enumerate(missing)}}
        self.model = tiktoken.Encoding(
            name=model_path.name,
            pat_str=config.pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id: int = self.special_tokens[config.bos_token]
        self.eos_id: int = self.special_tokens[config.eos_token]
        self.pad_id: int = self.special_tokens[config.pad_token]
        self.stop_tokens: List[int] = [self.special_tokens[name] for name in config.stop_tokens]
        self.chat_format: str = config.chat_format
        logger.debug("loaded tokenizer %s: %d words, BOS %d, EOS %d", model_path, self.n_words, self.bos_id, self.eos_id)

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> List[int]:
        """Encodes a string into token ids.

        Args:
            s: the text.
            bos: the text starts a sequence: prepend the beginning-of-text
                token (for vocabularies that use one).
            eos: append the end-of-text token.
            allowed_special: special tokens whose text is encoded as the special
                token ("all" for every one). By default none is: text such as
                "<|eot_id|>" is encoded as plain text, so user input cannot
                inject control tokens.
            disallowed_special: special tokens whose text raises an error
                instead (default none).

        Returns:
            The token ids.
        """
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        ids: List[int] = []
        for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in _split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS):
                ids.extend(
                    self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
                )
        ids = [i for i in ids if i < self._first_placeholder_id]
        if bos and self.config.add_bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids into a string; bytes that are not valid UTF-8 become U+FFFD."""
        return self.model.decode(list(t), errors="replace")


def load_tokenizer(path: Union[str, Path]) -> "Tokenizer":
    """The tokenizer a file describes, chosen from its content, not its name.

    - a converted checkpoint's `tokenizer.model` with a `tokenizer_config.json`
      beside it: that vocabulary (SmolLM2, Llama 3 from Hugging Face, ...);
    - tiktoken ranks (`<base64> <rank>` lines) alone: Meta's Llama 3 tokenizer;
    - a SentencePiece model (protobuf): the Llama 2 tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    config_path = path.with_name("tokenizer_config.json")
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("kind") == TokenizerConfig.KIND:
            return Tokenizer(path, TokenizerConfig.load(config_path))
    with open(path, "rb") as f:
        first_line = f.readline(200)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first_line):
        return Tokenizer(path)
    from llama.spm_tokenizer import SentencePieceTokenizer, is_sentencepiece_model

    if is_sentencepiece_model(path):
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"{path} is neither a tiktoken BPE file (Llama 3) nor a SentencePiece model (Llama 2); "
        f"convert Hugging Face or GGUF models with `python -m llama.convert`"
    )


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Splits `s` so that no piece holds more than `max_run` consecutive
    whitespace or consecutive non-whitespace characters."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    piece_start = 0
    for i, char in enumerate(s):
        is_space = char.isspace()
        if is_space != run_is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[piece_start:i]
                piece_start = i
                run_len = 1
    yield s[piece_start:]

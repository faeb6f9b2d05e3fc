"""Llama 3's tokenizer: byte-level BPE served by tiktoken, plus 256 special tokens."""

import base64
import logging
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Sequence, Union

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


class Tokenizer:
    """Encodes text to token ids and back, with Llama 3's vocabulary.

    Attributes:
        n_words: vocabulary size, special tokens included (128256 for Llama 3).
        bos_id, eos_id, pad_id: beginning/end of text and padding ids.
        stop_tokens: ids that end a generation (end of text, end of turn, end of message).
        special_tokens: name -> id of every special token.
    """

    def __init__(self, model_path: Union[str, Path]):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        mergeable_ranks = load_tiktoken_ranks(model_path)
        num_base_tokens = len(mergeable_ranks)

        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_CONTROL_TOKENS))
        ]
        special = LLAMA3_CONTROL_TOKENS + reserved
        self.special_tokens = {token: num_base_tokens + i for i, token in enumerate(special)}
        self.model = tiktoken.Encoding(
            name=model_path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = num_base_tokens + len(special)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [
            self.eos_id,
            self.special_tokens["<|eom_id|>"],
            self.special_tokens["<|eot_id|>"],
        ]
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
            bos: prepend the beginning-of-text token.
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
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids into a string; bytes that are not valid UTF-8 become U+FFFD."""
        return self.model.decode(list(t), errors="replace")


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

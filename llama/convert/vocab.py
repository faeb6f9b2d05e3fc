"""Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3 in Hugging Face
format) rewritten for tiktoken: a ranks file plus a `TokenizerConfig`.

tiktoken merges, inside each pre-tokenized piece, the adjacent pair whose
concatenation has the lowest rank. Hugging Face's BPE applies the merge list in
order. The two agree when every merged token's id grows with its merge's
position in the list, which is how BPE trainers number tokens; this is checked,
not assumed.
"""

import base64
import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from llama.tokenizer import LLAMA3_PATTERN, TokenizerConfig

logger = logging.getLogger(__name__)

# GPT-2's pre-tokenizer (Hugging Face's ByteLevel with use_regex=True).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# GPT-2 with every digit its own piece first (HF: Sequence[Digits(individual_digits=True),
# ByteLevel]). Splitting on digits first also ends a whitespace run at a digit, which
# `(?![^\s\p{N}])` reproduces in one regex; ` ?\p{N}+` can no longer match.
GPT2_ISOLATED_DIGITS_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

# llama.cpp's names for pre-tokenizers (GGUF `tokenizer.ggml.pre`) that we serve, mapped to
# the pattern that Hugging Face transformers uses when it loads such a GGUF file.
GGUF_PRE_TOKENIZER_PATTERNS = {
    "default": GPT2_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "smollm": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
}


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (bytes of
    printable Latin-1 map to themselves; the rest to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for ('Ġhello' -> b' hello')."""
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} is not a byte-level BPE token (character {e} has no byte)") from None


def byte_level_ranks(tokens: Sequence[str], special_ids: Iterable[int], merges: Sequence[str]) -> Dict[bytes, int]:
    """tiktoken ranks (bytes -> id) of every non-special token, after checking
    that ids follow the merge order, so that tiktoken merges as the model's BPE does."""
    special_ids = set(special_ids)
    ranks = {token_bytes(token): i for i, token in enumerate(tokens) if i not in special_ids}
    previous = -1
    for position, merge in enumerate(merges):
        left, right = merge.split(" ")
        merged_id = ranks.get(token_bytes(left) + token_bytes(right))
        if merged_id is None or merged_id <= previous:
            raise ValueError(
                f"merge {position} ({merge!r}) does not produce a token numbered after the previous merge's: "
                f"this vocabulary's ids are not in merge order, which tiktoken needs"
            )
        previous = merged_id
    return ranks


def write_ranks(path: Path, ranks: Dict[bytes, int]) -> None:
    """Writes tiktoken's BPE file format (as Meta's Llama 3 tokenizer.model): `base64(bytes) rank` lines."""
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def detect_chat_format(chat_template: Optional[str]) -> Optional[str]:
    """Our chat format for a Jinja chat template, recognised by its control tokens."""
    if not chat_template:
        return None
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "[INST]" in chat_template:
        return "llama2"
    return None


def default_system_prompt(chat_template: Optional[str]) -> Optional[str]:
    """The system prompt a ChatML template inserts when a dialog has none (SmolLM2 does)."""
    if not chat_template or "!= 'system'" not in chat_template:
        return None
    match = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", chat_template, re.DOTALL)
    return match.group(1) if match else None


def make_config(
    pattern: str,
    special_tokens: Dict[str, int],
    bos_id: Optional[int],
    eos_ids: List[int],
    pad_id: Optional[int],
    add_bos: bool,
    chat_template: Optional[str],
) -> TokenizerConfig:
    """A TokenizerConfig from a model's token ids and chat template.

    Stop tokens are the model's end-of-sequence ids plus its chat format's end
    of turn (and end of text), which is how its chat template ends a reply.
    """
    name_of = {i: name for name, i in special_tokens.items()}
    chat_format = detect_chat_format(chat_template)
    if chat_format is None:
        logger.warning("no known chat format in the model's chat template; chat_completion will be unavailable")
    stop_names = [name_of[i] for i in eos_ids if i in name_of]
    extra_stops = {"chatml": ["<|im_end|>", "<|endoftext|>"], "llama3": ["<|eot_id|>", "<|eom_id|>"]}
    stop_names += [n for n in extra_stops.get(chat_format, []) if n in special_tokens and n not in stop_names]
    if not stop_names:
        raise ValueError("the model names no special end-of-sequence token; cannot tell when generation stops")
    eos = stop_names[0]
    return TokenizerConfig(
        pattern=pattern,
        special_tokens=special_tokens,
        bos_token=name_of.get(bos_id, eos),
        eos_token=eos,
        pad_token=name_of.get(pad_id, eos),
        stop_tokens=stop_names,
        add_bos=add_bos and bos_id in name_of,
        chat_format=chat_format,
        default_system_prompt=default_system_prompt(chat_template) if chat_format == "chatml" else None,
    )


def pattern_from_hf_pre_tokenizer(pre_tokenizer: Optional[dict]) -> str:
    """The single tiktoken regex equivalent to a Hugging Face byte-level pre-tokenizer."""
    if pre_tokenizer is None:
        raise ValueError("tokenizer.json has no pre_tokenizer; only byte-level BPE tokenizers are supported")
    kind = pre_tokenizer["type"]
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre_tokenizer["pretokenizers"]
        kinds = [step["type"] for step in steps]
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            return steps[0]["pattern"]["Regex"]  # Llama 3 in HF format: the regex itself
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return GPT2_ISOLATED_DIGITS_PATTERN
        if kinds == ["ByteLevel"]:
            return pattern_from_hf_pre_tokenizer(steps[0])
    raise ValueError(f"unsupported pre-tokenizer in tokenizer.json: {pre_tokenizer}")

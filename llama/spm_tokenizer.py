"""Llama 2's tokenizer: a SentencePiece BPE model with byte fallback.

Llama 2 and Code Llama ship it as `tokenizer.model` (32000 pieces; Code Llama
32016). Unlike Llama 3's tiktoken vocabulary it has only three special
tokens, <unk>, <s> and </s>, and no padding token (pad_id is -1). Text is
always encoded as plain text: SentencePiece never turns text into a control
token, so "<s>" or "[INST]" typed by a user are characters, not tokens.
"""

import logging
from pathlib import Path
from typing import AbstractSet, Collection, Dict, List, Literal, Sequence, Union

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)

# A serialized SentencePiece ModelProto starts with its pieces (field 1,
# length-delimited: tag byte 0x0A), since protobuf writes fields in number order.
MODEL_PROTO_FIRST_BYTE = b"\x0a"


def is_sentencepiece_model(path: Union[str, Path]) -> bool:
    """Whether the file holds a SentencePiece model, judged from its content, never its name."""
    with open(path, "rb") as f:
        # A cheap look first, so that a multi-GB file of another kind is never read whole.
        if f.read(1) != MODEL_PROTO_FIRST_BYTE:
            return False
    try:
        return SentencePieceProcessor(model_file=str(path)).get_piece_size() > 0
    except RuntimeError:  # sentencepiece's error for a file that does not parse as a model
        return False


class SentencePieceTokenizer:
    """Encodes text to token ids and back with a SentencePiece model (Llama 2, Code Llama).

    The interface of `llama.tokenizer.Tokenizer`, so generation and chat code
    use either. Encoding is `SentencePieceProcessor.encode`, exactly as in
    Meta's reference (`meta-llama/llama`).

    Attributes:
        n_words: vocabulary size (32000 for Llama 2).
        bos_id, eos_id: beginning/end of sequence ids (<s> 1, </s> 2 for Llama 2).
        pad_id: padding id; -1 for Llama 2, which has no padding piece.
        stop_tokens: ids that end a generation: [eos_id].
        special_tokens: name -> id of the control and unknown pieces (<unk>, <s>, </s>).
        chat_format: "llama2" ([INST] ... [/INST] turns).
    """

    def __init__(self, model_path: Union[str, Path]):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        try:
            self.sp_model = SentencePieceProcessor(model_file=str(model_path))
        except RuntimeError as e:
            raise ValueError(f"{model_path} is not a SentencePiece model (Llama 2's tokenizer.model): {e}") from e
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{model_path} defines no <s> or </s> piece (bos_id {self.bos_id}, eos_id {self.eos_id}); "
                f"Llama 2's tokenizer has both: use the tokenizer.model that ships with the checkpoint"
            )
        self.stop_tokens: List[int] = [self.eos_id]
        self.special_tokens: Dict[str, int] = {
            self.sp_model.id_to_piece(i): i
            for i in range(self.n_words)
            if self.sp_model.is_control(i) or self.sp_model.is_unknown(i)
        }
        self.chat_format: str = "llama2"
        logger.debug(
            "loaded tokenizer %s: %d words, BOS %d, EOS %d", model_path, self.n_words, self.bos_id, self.eos_id
        )

    def encode(
        self,
        s: str,
        bos: bool,
        eos: bool,
        *,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Encodes a string into token ids.

        Args:
            s: the text.
            bos: prepend the beginning-of-sequence token <s>.
            eos: append the end-of-sequence token </s>.
            allowed_special: accepted for the interface of `Tokenizer.encode`,
                but must be empty: SentencePiece cannot encode text as a special token.
            disallowed_special: accepted and ignored: no text ever becomes a
                special token, so there is nothing to disallow.

        Returns:
            The token ids.

        Raises:
            ValueError: allowed_special names special tokens.
        """
        if not isinstance(s, str):
            raise TypeError(f"SentencePieceTokenizer.encode expects a str, got {type(s).__name__}")
        if allowed_special:
            raise ValueError(
                "a SentencePiece tokenizer encodes all text as plain text and cannot turn it into special "
                "tokens: pass bos=True / eos=True, or insert the ids (tokenizer.special_tokens) yourself"
            )
        ids = self.sp_model.encode(s)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids into a string.

        Byte pieces that do not form valid UTF-8 (a character cut in the middle)
        become U+FFFD, one per byte; <s> and </s> decode to nothing.
        """
        return self.sp_model.decode(list(t))

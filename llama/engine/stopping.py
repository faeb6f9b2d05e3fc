"""When a sequence ends: the one stop check of every decoding loop.

A sequence ends at the first of:
    a stop token        (the tokenizer's end of turn / end of text); not part of the result
    a stop string       once the decoded text holds it; the token completing it is the last one kept
    its length limit    max_new_tokens, or the end of the context (max_seq_len), whichever comes first

The text is decoded only when something needs it (stop strings, or a caller that
streams it), through `TextStream`, which holds back unfinished characters and
possible beginnings of a stop string.
"""

from typing import Optional, Sequence, Tuple

from llama.streaming import TextStream


class StopCriteria:
    """The stop rules of one sequence, fed its tokens one at a time.

    Args:
        tokenizer: for the stop tokens and, when text is needed, the decoding.
        prompt_len: tokens in the prompt: the context leaves max_seq_len - prompt_len for the answer.
        max_new_tokens: most tokens the caller wants.
        max_seq_len: the model's context (sizes of its KV cache).
        stop: stop strings.
        text: decode the text as it grows (for streaming), even without stop strings.
    """

    def __init__(self, tokenizer, prompt_len: int, max_new_tokens: int, max_seq_len: int, *,
                 stop: Sequence[str] = (), text: bool = False):
        self.stop_tokens = frozenset(tokenizer.stop_tokens)
        self.limit = min(max_new_tokens, max_seq_len - prompt_len)  # the length limit, the only place it is set
        self.text = TextStream(tokenizer, stop) if stop or text else None
        self.num_tokens = 0  # tokens of the result so far
        self.reason: Optional[str] = None  # "stop" or "length" once it has ended
        self.cause: Optional[str] = None  # what ended it: "stop token", "stop string" or "length"

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def append(self, token: int) -> Tuple[str, Optional[str]]:
        """Takes the next token. Returns the text that became final with it ("" without text,
        and the held-back rest when the sequence ends), and "stop" / "length" if it ends here."""
        if token in self.stop_tokens:
            return self._end("stop", "stop token", "")
        self.num_tokens += 1
        piece = self.text.push(token) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            return self._end("stop", "stop string", piece)
        if self.num_tokens >= self.limit:
            return self._end("length", "length", piece)
        return piece, None

    def _end(self, reason: str, cause: str, piece: str) -> Tuple[str, str]:
        self.reason, self.cause = reason, cause
        rest = self.text.flush() if self.text is not None else ""  # "" after a stop string
        return piece + rest, reason

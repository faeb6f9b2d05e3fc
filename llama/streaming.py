"""Text that is safe to show while tokens are still arriving.

A token is not a unit of text: one character of UTF-8 may span two tokens
(an emoji, a CJK character in a byte-level vocabulary), and a stop string may
span several. `TextStream` takes tokens one at a time and hands out only the
text that no later token can change: it holds back an unfinished character
(decoded as U+FFFD until its last byte arrives) and any tail that could be
the start of a stop string, and it ends the stream before a stop string.
"""

from typing import List, Sequence


class TextStream:
    """Incremental detokenizer with stop strings.

    Usage:
        stream = TextStream(tokenizer, stop=["\\n\\n"])
        for token in tokens:
            print(stream.push(token), end="")
            if stream.stopped:
                break
        print(stream.flush())
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: List[int] = []
        self.text = ""  # all tokens decoded
        self.emitted = 0  # characters of self.text handed out so far
        self.stopped = False  # a stop string was reached: nothing more will be handed out

    @property
    def shown(self) -> str:
        """The text handed out so far: after `flush`, the whole text, cut before a stop string."""
        return self.text[: self.emitted]

    def push(self, token: int) -> str:
        """Adds one token; returns the text that became final (often "", sometimes several characters)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        # Decoding everything again keeps this simple and exact (merges and byte
        # fallback see the whole sequence); it costs O(n) per token.
        self.text = self.tokenizer.decode(self.tokens)
        return self._take(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation (an unfinished character stays U+FFFD)."""
        return "" if self.stopped else self._take(final=True)

    def _take(self, final: bool) -> str:
        text, start = self.text, self.emitted
        # A stop string ends the stream; the text before it is the last piece.
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._emit(min(found))
        end = len(text)
        if not final:
            while end > start and text[end - 1] == "\ufffd":  # bytes of a character still to come
                end -= 1
            end -= self._possible_stop_start(text[start:end])
        return self._emit(end)

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of text that is the beginning of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

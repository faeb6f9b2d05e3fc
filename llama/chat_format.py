"""Chat formats: how a dialog becomes the token ids of a prompt.

Message text is always encoded as plain text: a user who types "<|eot_id|>"
gets the characters, never the control token.
"""

from typing import TYPE_CHECKING, List, Literal, Sequence, TypedDict

if TYPE_CHECKING:
    from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

ROLES = ("system", "user", "assistant", "ipython")  # ipython: the result of a tool call


def validate_dialog(dialog: Dialog) -> None:
    """Raises ValueError naming the first malformed message of `dialog`."""
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ValueError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError("a dialog must hold at least one message")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(message['content']).__name__}")


class ChatFormat:
    """Llama 3's chat format.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model continues here
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.start_header_id = tokenizer.special_tokens["<|start_header_id|>"]
        self.end_header_id = tokenizer.special_tokens["<|end_header_id|>"]
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]

    def encode_header(self, message: Message) -> List[int]:
        return [
            self.start_header_id,
            *self.tokenizer.encode(message["role"], bos=False, eos=False),
            self.end_header_id,
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> List[int]:
        tokens = self.encode_header(message)
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        tokens.append(self.eot_id)
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Token ids of the whole dialog, ending with an open assistant header."""
        validate_dialog(dialog)
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens

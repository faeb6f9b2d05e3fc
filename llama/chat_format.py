"""Chat formats: how a dialog becomes the token ids of a prompt.

Each model family was trained with one; `make_chat_format` picks the one a
tokenizer declares (Llama 3 headers for Meta's Llama 3, ChatML for SmolLM2,
[INST] turns for Llama 2, ...).

Message text is always encoded as plain text: a user who types "<|eot_id|>"
gets the characters, never the control token. Llama 2's tags are plain text
to begin with, so its format also has `refusal(dialog)`: the answer to give,
instead of generating, to a dialog that spells them.
"""

from typing import TYPE_CHECKING, List, Literal, Optional, Sequence, TypedDict

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
        if not message["content"].strip():
            raise ValueError(f"message {i} ({message['role']}) has empty content")


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


class ChatMLFormat:
    """ChatML, as SmolLM2, Qwen and others use it.

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{user}<|im_end|>\n
    <|im_start|>assistant\n      <- the model continues here

    Models whose template inserts a default system prompt when the dialog has
    none get it here too (`default_system_prompt`).
    """

    def __init__(self, tokenizer: "Tokenizer", default_system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.default_system_prompt = default_system_prompt
        self.im_start_id = tokenizer.special_tokens["<|im_start|>"]
        self.im_end_id = tokenizer.special_tokens["<|im_end|>"]
        self.newline = tokenizer.encode("\n", bos=False, eos=False)

    def encode_message(self, message: Message) -> List[int]:
        body = self.tokenizer.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False)
        return [self.im_start_id, *body, self.im_end_id, *self.newline]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Token ids of the whole dialog, ending with an open assistant turn."""
        validate_dialog(dialog)
        messages = list(dialog)
        if self.default_system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system_prompt})
        tokens = [self.tokenizer.bos_id] if self.tokenizer.config.add_bos else []
        for message in messages:
            tokens.extend(self.encode_message(message))
        tokens.append(self.im_start_id)
        tokens.extend(self.tokenizer.encode("assistant\n", bos=False, eos=False))
        return tokens


# Llama 2's turn and system-prompt tags: plain text, not special tokens.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
LLAMA2_UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


class Llama2ChatFormat:
    """Llama 2's chat format, built exactly as Meta's reference (`meta-llama/llama`) builds it.

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>
    <s>[INST] {user} [/INST]      <- the model continues here

    The system message, if any, is merged into the first user message; each
    earlier exchange is a sequence of its own, <s> ... </s>. The tags are
    plain text, so a user could forge turns by typing them: `refusal` flags
    such dialogs, and `Llama.chat_completion` answers them with an error
    message instead of generating, as the reference does.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    def refusal(self, dialog: Dialog) -> Optional[str]:
        """The answer to give instead of generating, for a dialog whose text holds Llama 2's tags; else None."""
        if any(tag in message["content"] for message in dialog for tag in LLAMA2_SPECIAL_TAGS):
            return LLAMA2_UNSAFE_ERROR
        return None

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Token ids of the whole dialog, ending with the last user message's [/INST].

        Raises:
            ValueError: the roles are not an optional system message, then user
                and assistant alternating, ending with user.
        """
        validate_dialog(dialog)
        roles = [message["role"] for message in dialog]
        turns = roles[1:] if roles[0] == "system" else roles
        if turns != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
            raise ValueError(
                f"Llama 2's chat format takes an optional system message, then user and assistant messages "
                f"alternating, ending with user; got roles {', '.join(roles)}"
            )
        messages = list(dialog)
        if roles[0] == "system":
            system, first, *rest = messages
            messages = [{"role": "user", "content": B_SYS + system["content"] + E_SYS + first["content"]}, *rest]

        tokens: List[int] = []
        for prompt, answer in zip(messages[::2], messages[1::2]):
            tokens.extend(
                self.tokenizer.encode(
                    f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True
                )
            )
        last = messages[-1]["content"].strip()
        tokens.extend(self.tokenizer.encode(f"{B_INST} {last} {E_INST}", bos=True, eos=False))
        return tokens


class NoChatFormat:
    """For base models converted without a chat template: text completion only."""

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        raise ValueError(
            "this model declares no chat format (its chat template was missing or unknown): "
            "use text_completion, or a chat/instruct model"
        )


def make_chat_format(tokenizer: "Tokenizer"):
    """The chat format the tokenizer's model was trained with."""
    name = getattr(tokenizer, "chat_format", "llama3")
    if name == "llama3":
        return ChatFormat(tokenizer)
    if name == "chatml":
        return ChatMLFormat(tokenizer, tokenizer.config.default_system_prompt)
    if name == "llama2":
        return Llama2ChatFormat(tokenizer)
    if name is None:
        return NoChatFormat()
    raise ValueError(f"unknown chat format {name!r}; known: llama3, chatml, llama2")

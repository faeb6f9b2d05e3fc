"""Chat formats: how a dialog becomes the token ids of a prompt.

Each model family was trained with one; `make_chat_format` picks the one a
tokenizer declares (Llama 3 headers for Meta's Llama 3, ChatML for SmolLM2,
[INST] turns for Llama 2, ...).

Message text is always encoded as plain text: a user who types "<|eot_id|>"
gets the characters, never the control token. Llama 2's tags are plain text
to begin with, so its format also has `refusal(dialog)`: the answer to give,
instead of generating, to a dialog that spells them.

Llama 3 and ChatML also call tools (`llama.tools` writes and reads the calls):
`encode_dialog_prompt(dialog, tools=[...])` shows the tools to the model, a
dialog may hold the assistant's earlier calls ("tool_calls") and their results
(role "tool"), and `parse_reply` reads the calls out of a generated reply.
"""

from datetime import date
from itertools import groupby
from typing import TYPE_CHECKING, Dict, List, Literal, NotRequired, Optional, Sequence, TypedDict, Union

from llama.tools import (
    AssistantMessage,
    ToolCall,
    apply_tool_choice,
    ends_with_eom,
    hermes_tool_results,
    normalize_tools,
    parse_reply,
    read_tool_calls,
    render_calls,
    render_tool_prompt,
    starts_with_python_tag,
)

if TYPE_CHECKING:
    from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "tool", "ipython"]


class Message(TypedDict):
    role: Role
    content: Optional[str]  # None only beside tool_calls
    tool_calls: NotRequired[List[ToolCall]]  # assistant: the tools it called (OpenAI's shape)
    tool_call_id: NotRequired[str]  # tool: the call it answers (the formats do not show it)


Dialog = Sequence[Message]

# tool (OpenAI's name) and ipython (Meta's): the result of a tool call.
ROLES = ("system", "user", "assistant", "tool", "ipython")


def validate_dialog(dialog: Dialog) -> None:
    """Raises ValueError naming the first malformed message of `dialog`."""
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ValueError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError("a dialog must hold at least one message")
    for i, message in enumerate(dialog):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(message, dict) or "role" not in message or ("content" not in message and not calls):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if calls:  # a turn that called tools may have no text
            if message["role"] != "assistant":
                raise ValueError(f"message {i} ({message['role']}) has tool_calls; only assistant messages call tools")
            read_tool_calls(message, i)
            if content is None:
                continue
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a str, got {type(content).__name__}")
        if not content.strip() and not calls and message["role"] != "tool":  # a tool may return nothing
            raise ValueError(f"message {i} ({message['role']}) has empty content")


def choose_tool_format(name: Optional[str], supported: Sequence[str]) -> str:
    """The tool format asked for, checked against a chat format's; None: its first (default)."""
    if not supported:
        raise ValueError("this model's chat format has no tool calling (Llama 2, or no chat template)")
    if name is None:
        return supported[0]
    if name not in supported:
        raise ValueError(f"tool_format {name!r} is not one this model's chat format writes: {', '.join(supported)}")
    return name


class ChatFormat:
    """Llama 3's chat format.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model continues here

    With tools, as llama-models' ChatFormat writes them: a tool result is an
    ipython turn; a turn that called tools holds the calls' text and ends with
    <|eom_id|> ("a tool result comes next") where the tool format says so.

    Attributes:
        tool_formats: the tool formats it writes, the default first.
        stop_reasons: stop token id -> "eom" (the model waits for a tool result) or "eot".
    """

    tool_formats = ("llama3.1", "llama3.2")

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.start_header_id = tokenizer.special_tokens["<|start_header_id|>"]
        self.end_header_id = tokenizer.special_tokens["<|end_header_id|>"]
        self.eot_id = tokenizer.special_tokens["<|eot_id|>"]
        # Llama 3.1's names: a Llama 3.0 vocabulary converted from Hugging Face may lack them.
        self.eom_id = tokenizer.special_tokens.get("<|eom_id|>")
        self.python_tag_id = tokenizer.special_tokens.get("<|python_tag|>")
        self.stop_reasons: Dict[int, str] = {t: "eom" if t == self.eom_id else "eot" for t in tokenizer.stop_tokens}

    def encode_header(self, message: Message) -> List[int]:
        role = "ipython" if message["role"] == "tool" else message["role"]
        return [
            self.start_header_id,
            *self.tokenizer.encode(role, bos=False, eos=False),
            self.end_header_id,
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message, tool_format: str = "llama3.1") -> List[int]:
        calls = read_tool_calls(message, 0) if message.get("tool_calls") else []
        tokens = self.encode_header(message)
        if starts_with_python_tag(calls):
            tokens.append(self._tool_token("<|python_tag|>", self.python_tag_id))
        tokens.extend(self.tokenizer.encode((message.get("content") or "").strip(), bos=False, eos=False))
        for piece in render_calls(tool_format, calls):
            tokens.extend(self.tokenizer.encode(piece, bos=False, eos=False))
        tokens.append(self._tool_token("<|eom_id|>", self.eom_id) if ends_with_eom(tool_format, calls) else self.eot_id)
        return tokens

    def encode_dialog_prompt(
        self,
        dialog: Dialog,
        tools: Optional[Sequence[dict]] = None,
        tool_choice: Union[str, dict] = "auto",
        tool_format: Optional[str] = None,
        today: Optional[date] = None,
    ) -> List[int]:
        """Token ids of the whole dialog, ending with an open assistant header.

        Args:
            dialog: the messages.
            tools: tool definitions (see `llama.tools`): shown in the system prompt,
                the dialog's own system message merged in. None: the prompt of a
                plain chat (earlier calls and results in the dialog still encode).
            tool_choice: "auto", "none", "required" or {"type": "function", "function": {"name": ...}}.
            tool_format: "llama3.1" (default: JSON function calls) or "llama3.2"
                (pythonic calls, for Llama 3.2's 1B and 3B instruct models).
            today: the date Llama 3.1's tool prompt states (default: today).

        Raises:
            ValueError: a malformed dialog, tool definition or tool_choice.
        """
        tool_format = choose_tool_format(tool_format, self.tool_formats)
        validate_dialog(dialog)
        tools, instruction = apply_tool_choice(normalize_tools(tools, tool_format), tool_choice)
        messages = list(dialog)
        tokens = [self.tokenizer.bos_id]
        if tools:
            system = messages.pop(0)["content"].strip() if messages[0]["role"] == "system" else None
            prompt = render_tool_prompt(tool_format, tools, system, instruction, today)
            # Meta's exact text, not stripped as message contents are.
            for role, text in (("system", prompt.system), ("user", prompt.user)):
                if text is not None:
                    tokens.extend(self.encode_header({"role": role, "content": text}))
                    tokens.extend(self.tokenizer.encode(text, bos=False, eos=False))
                    tokens.append(self.eot_id)
        for message in messages:
            tokens.extend(self.encode_message(message, tool_format))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens

    def parse_reply(
        self, text: str, tools: Optional[Sequence[dict]] = None, tool_format: Optional[str] = None
    ) -> AssistantMessage:
        """The assistant message of a generated reply, with the calls it makes to `tools`
        (the tools its prompt showed; None or []: no calls are read)."""
        tool_format = choose_tool_format(tool_format, self.tool_formats)
        return parse_reply(text, normalize_tools(tools, tool_format), tool_format)

    def stop_reason(self, token: int) -> Optional[str]:
        """"eom" (the turn waits for tool results), "eot" (it is over), or None for a token that ends no turn."""
        return self.stop_reasons.get(token)

    def _tool_token(self, name: str, token: Optional[int]) -> int:
        if token is None:
            raise ValueError(f"this Llama 3 vocabulary has no {name} (Llama 3.0?): tool calls need Llama 3.1 or later")
        return token


class ChatMLFormat:
    """ChatML, as SmolLM2, Qwen and others use it.

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{user}<|im_end|>\n
    <|im_start|>assistant\n      <- the model continues here

    Models whose template inserts a default system prompt when the dialog has
    none get it here too (`default_system_prompt`).

    Tools are written in the Hermes convention (`llama.tools`): the tool list
    ends the system prompt, calls are <tool_call> blocks of the assistant's
    turn, and consecutive tool results are <tool_response> blocks of one user turn.

    Attributes:
        tool_formats: the tool formats it writes ("hermes").
        stop_reasons: stop token id -> "eot" (ChatML has no end-of-message token).
    """

    tool_formats = ("hermes",)

    def __init__(self, tokenizer: "Tokenizer", default_system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.default_system_prompt = default_system_prompt
        self.im_start_id = tokenizer.special_tokens["<|im_start|>"]
        self.im_end_id = tokenizer.special_tokens["<|im_end|>"]
        self.newline = tokenizer.encode("\n", bos=False, eos=False)
        self.stop_reasons: Dict[int, str] = {t: "eot" for t in tokenizer.stop_tokens}

    def encode_message(self, message: Message) -> List[int]:
        body = self.tokenizer.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False)
        return [self.im_start_id, *body, self.im_end_id, *self.newline]

    def encode_dialog_prompt(
        self,
        dialog: Dialog,
        tools: Optional[Sequence[dict]] = None,
        tool_choice: Union[str, dict] = "auto",
        tool_format: Optional[str] = None,
        today: Optional[date] = None,
    ) -> List[int]:
        """Token ids of the whole dialog, ending with an open assistant turn.

        Args: as `ChatFormat.encode_dialog_prompt`'s; tool_format can only be
        "hermes", and `today` is not used (the prompt states no date).
        """
        choose_tool_format(tool_format, self.tool_formats)
        validate_dialog(dialog)
        tools, instruction = apply_tool_choice(normalize_tools(tools, "hermes"), tool_choice)
        messages = _hermes_messages(dialog)
        if self.default_system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system_prompt})
        if tools:
            system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
            prompt = render_tool_prompt("hermes", tools, system, instruction)
            messages.insert(0, {"role": "system", "content": prompt.system})
        tokens = [self.tokenizer.bos_id] if self.tokenizer.config.add_bos else []
        for message in messages:
            tokens.extend(self.encode_message(message))
        tokens.append(self.im_start_id)
        tokens.extend(self.tokenizer.encode("assistant\n", bos=False, eos=False))
        return tokens

    def parse_reply(
        self, text: str, tools: Optional[Sequence[dict]] = None, tool_format: Optional[str] = None
    ) -> AssistantMessage:
        """As `ChatFormat.parse_reply`: the reply's <tool_call> blocks read out, the rest its content."""
        choose_tool_format(tool_format, self.tool_formats)
        return parse_reply(text, normalize_tools(tools, "hermes"), "hermes")

    def stop_reason(self, token: int) -> Optional[str]:
        """"eot" for a token that ends the turn, else None."""
        return self.stop_reasons.get(token)


def _hermes_messages(dialog: Dialog) -> List[Message]:
    """The dialog as plain ChatML messages: calls written into the assistant's text,
    each run of tool results merged into one user message."""
    messages: List[Message] = []
    for is_result, run in groupby(enumerate(dialog), key=lambda item: item[1]["role"] == "tool"):
        run = list(run)
        if is_result:
            messages.append({"role": "user", "content": hermes_tool_results([m["content"] for _, m in run])})
            continue
        for i, message in run:
            if message.get("tool_calls"):
                calls = "".join(render_calls("hermes", read_tool_calls(message, i)))
                text = message.get("content")
                message = {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
            messages.append(message)
    return messages


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

    tool_formats = ()  # Llama 2 calls no tools

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    def refusal(self, dialog: Dialog) -> Optional[str]:
        """The answer to give instead of generating, for a dialog whose text holds Llama 2's tags; else None."""
        if any(tag in (message.get("content") or "") for message in dialog for tag in LLAMA2_SPECIAL_TAGS):
            return LLAMA2_UNSAFE_ERROR
        return None

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Token ids of the whole dialog, ending with the last user message's [/INST].

        Raises:
            ValueError: the roles are not an optional system message, then user
                and assistant alternating, ending with user.
        """
        validate_dialog(dialog)
        if any(message.get("tool_calls") for message in dialog):
            raise ValueError("Llama 2's chat format has no tool calls: its assistant messages hold text only")
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

    tool_formats = ()

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

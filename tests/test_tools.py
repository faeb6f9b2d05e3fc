"""Tool calling: prompts with tools, calls and tool results token for token as llama-models
writes them (its ChatFormat on Meta's tokenizer, and the prompts its prompt format
documents show), and replies parsed back into calls."""

import json
import re
from datetime import date
from pathlib import Path

import pytest

from llama.chat_format import ChatFormat, Llama2ChatFormat, make_chat_format
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tools import (
    ToolCallStream,
    finish_reason,
    forced_call_grammar,
    normalize_tools,
    parse_reply,
    render_calls,
    render_tool_prompt,
)

TODAY = date(2024, 9, 21)  # the date of llama-models' Llama 3.1 examples

TRENDING_SONGS = {  # llama-models' example function, as an OpenAI tool
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {"type": "int", "description": "The number of songs to return"},
                "genre": {"type": "str", "description": "The genre of the songs to return"},
            },
            "required": ["n"],
        },
    },
}
GET_WEATHER = {  # llama-models' Llama 3.2 example function
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The name of the city to get the weather for"},
                "metric": {
                    "type": "string",
                    "description": "The metric for weather. Options are: celsius, fahrenheit",
                    "default": "celsius",
                },
            },
            "required": ["city"],
        },
    },
}
BUILTINS = [{"type": "brave_search"}, {"type": "wolfram_alpha"}]


def call(name, arguments, id="call_1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def calls_of(message):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


# --- llama-models, the reference ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def chat_format(tokenizer):
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def reference(llama3_tokenizer_path):
    """llama-models' ChatFormat with its own tokenizer."""
    from llama_models.llama3.chat_format import ChatFormat as ReferenceFormat
    from llama_models.llama3.tokenizer import Tokenizer as ReferenceTokenizer

    return ReferenceFormat(ReferenceTokenizer(llama3_tokenizer_path))


def raw_message(message):
    """llama-models' RawMessage for ("system" | "user" | "tool", text) or ("assistant", text, calls, eom)."""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    role, content, *rest = message
    if role != "assistant":
        return RawMessage(role=role, content=content)
    calls, eom = rest
    return RawMessage(
        role="assistant", content=content,
        stop_reason=StopReason.end_of_message if eom else StopReason.end_of_turn,
        tool_calls=[ToolCall(call_id=str(i), tool_name=name, arguments=args) for i, (name, args) in enumerate(calls)],
    )


def reference_ids(reference, messages, tool_prompt_format="json"):
    from llama_models.datatypes import ToolPromptFormat

    raw = [raw_message(m) for m in messages]
    return reference.encode_dialog_prompt(raw, ToolPromptFormat(tool_prompt_format)).tokens


def documented(doc: str, title: str, block: str = "Input Prompt Format") -> str:
    """A prompt (or model response) from llama-models' prompt format documentation, section `title`."""
    import llama_models

    text = (Path(llama_models.__file__).parent / doc).read_text()
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(rf"##### {block}\n```\n(.*?)\n```", section, re.DOTALL).group(1)


def documented_messages(prompt: str):
    """(role, content) of each turn of a documented prompt that ends with <|eot_id|>."""
    turns = []
    for chunk in prompt.split("<|start_header_id|>")[1:]:
        role, content = chunk.split("<|end_header_id|>\n\n", 1)
        if content.endswith("<|eot_id|>"):
            turns.append((role, content.removesuffix("<|eot_id|>")))
    return turns


# --- Llama 3.1 ----------------------------------------------------------------------------------


def test_llama31_builtin_tools_prompt(chat_format, tokenizer, reference):
    prompt = documented("llama3_1/prompt_format.md", "Builtin Tool Calling")
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    ids = chat_format.encode_dialog_prompt(dialog, tools=BUILTINS, today=TODAY)
    assert tokenizer.decode(ids) == prompt
    assert ids == reference_ids(reference, documented_messages(prompt))


def test_llama31_json_functions_prompt(chat_format, tokenizer, reference):
    """Functions are listed in a user message after the system prompt."""
    prompt = documented("llama3_1/prompt_format.md", "JSON based tool calling")
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Use tools to get latest trending songs"}]
    ids = chat_format.encode_dialog_prompt(dialog, tools=[TRENDING_SONGS], today=TODAY)
    assert tokenizer.decode(ids) == prompt
    assert ids == reference_ids(reference, documented_messages(prompt))


def test_llama31_builtin_call_and_result(chat_format, reference):
    """The call turn ends with <|eom_id|>; the result is an ipython turn. (The documentation's older
    rendering has <|python_tag|> before built-in calls; llama-models' ChatFormat, and we, write none.)"""
    system = documented_messages(documented("llama3_1/prompt_format.md", "Builtin Tool Calling"))[0]
    result = documented_messages(documented("llama3_1/prompt_format.md", "Built-in tools full interaction"))[2][1]
    result = result.strip()
    question, query = "What is the 100th decimal of pi?", {"query": "100th decimal of pi"}
    dialog = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call("wolfram_alpha", query)]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": "The 100th decimal of pi is 7."},
        {"role": "user", "content": 'And search "pi" on the web'},
        {"role": "assistant", "content": "Searching.", "tool_calls": [call("brave_search", {"query": "pi"})]},
    ]
    expected = reference_ids(reference, [
        system, ("user", question), ("assistant", "", [("wolfram_alpha", query)], True), ("tool", result),
        ("assistant", "The 100th decimal of pi is 7.", [], False), ("user", 'And search "pi" on the web'),
        ("assistant", "Searching.", [("brave_search", {"query": "pi"})], True),
    ])
    assert chat_format.encode_dialog_prompt(dialog, tools=BUILTINS, today=TODAY) == expected
    assert chat_format.eom_id in expected


def test_llama31_function_call_and_result(chat_format, reference):
    messages = documented_messages(documented("llama3_1/prompt_format.md", "JSON based tool calling"))
    arguments = {"n": "10", "genre": "all"}
    songs = json.dumps(["great song1", "awesome song2", "cool song3"])
    dialog = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Use tools to get latest trending songs"},
        {"role": "assistant", "content": "", "tool_calls": [call("trending_songs", arguments)]},
        {"role": "tool", "tool_call_id": "call_1", "content": songs},
    ]
    expected = reference_ids(reference, [*messages, ("assistant", "", [("trending_songs", arguments)], True),
                                         ("tool", songs)])
    assert chat_format.encode_dialog_prompt(dialog, tools=[TRENDING_SONGS], today=TODAY) == expected


def test_llama31_code_interpreter(chat_format, tokenizer, reference):
    """Code goes after <|python_tag|>; code_interpreter needs no "Tools:" line."""
    prompt = documented("llama3_2/text_prompt_format.md", "Code Interpreter")  # built the 3.1 way
    question = "Write code to check if number is prime. Use it to verify if number 7 is prime"
    ids = chat_format.encode_dialog_prompt([{"role": "user", "content": question}],
                                           tools=[{"type": "code_interpreter"}], today=date(2024, 9, 24))
    assert tokenizer.decode(ids) == prompt
    code = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n\nprint(is_prime(7))"
    dialog = [{"role": "user", "content": question},
              {"role": "assistant", "content": None, "tool_calls": [call("code_interpreter", {"code": code})]},
              {"role": "tool", "content": "True"}]
    expected = reference_ids(reference, [*documented_messages(prompt), ("assistant", "", [("code_interpreter",
                                                                        {"code": code})], True), ("tool", "True")])
    assert chat_format.encode_dialog_prompt(dialog, tools=[{"type": "code_interpreter"}],
                                            today=date(2024, 9, 24)) == expected
    assert chat_format.python_tag_id in expected


# --- Llama 3.2 ----------------------------------------------------------------------------------


def test_llama32_pythonic_prompt(chat_format, tokenizer, reference):
    prompt = documented("llama3_2/text_prompt_format.md", "Zero shot function calling")
    dialog = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    ids = chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_format="llama3.2")
    assert tokenizer.decode(ids) == prompt
    assert ids == reference_ids(reference, documented_messages(prompt))


def test_llama32_call_and_result(chat_format, reference):
    """A pythonic call ends its turn with <|eot_id|>, a built-in call with <|eom_id|>."""
    e2e = documented("llama3_2/text_prompt_format.md", "Zero shot function calling E2E format")
    system = documented_messages(e2e)[0]
    arguments = {"city": "San Francisco", "metric": "celsius"}
    dialog = [
        {"role": "user", "content": "What is the weather in SF?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", arguments)]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps("25 C")},
    ]
    expected = reference_ids(reference, [system, ("user", "What is the weather in SF?"),
                                         ("assistant", "", [("get_weather", arguments)], False),
                                         ("tool", json.dumps("25 C"))], "python_list")
    assert chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_format="llama3.2") == expected

    search = {"role": "assistant", "content": None, "tool_calls": [call("brave_search", {"query": "SF weather"})]}
    expected = reference.encode_message(raw_message(("assistant", "", [("brave_search", {"query": "SF weather"})],
                                                     True)), "python_list")[0]
    assert chat_format.encode_message(search, "llama3.2") == expected


def test_llama32_several_calls_are_one_list(chat_format, tokenizer):
    message = {"role": "assistant", "content": None, "tool_calls": [
        call("get_weather", {"city": "SF"}), call("get_weather", {"city": "Seattle", "days": [1, 2], "x": None})]}
    text = tokenizer.decode(chat_format.encode_message(message, "llama3.2"))
    assert text.endswith('\n\n[get_weather(city="SF"), get_weather(city="Seattle", days=[1, 2], x=None)]<|eot_id|>')


# --- Parsing replies ----------------------------------------------------------------------------

DOCUMENTED_REPLIES = [  # (doc, section, tools the prompt showed, the calls)
    ("llama3_1/prompt_format.md", "Builtin Tool Calling", BUILTINS,
     [("brave_search", {"query": "latest price of 1oz gold"})]),
    ("llama3_1/prompt_format.md", "JSON based tool calling", [TRENDING_SONGS],
     [("trending_songs", {"n": "10", "genre": "all"})]),
    ("llama3_1/prompt_format.md", "`<function>` based tool calling", [TRENDING_SONGS], [("trending_songs", {"n": 10})]),
    ("llama3_2/text_prompt_format.md", "Zero shot function calling", [GET_WEATHER],
     [("get_weather", {"city": "San Francisco", "metric": "celsius"}),
      ("get_weather", {"city": "Seattle", "metric": "celsius"})]),
]


@pytest.mark.parametrize("doc, title, tools, expected", DOCUMENTED_REPLIES, ids=[r[1] for r in DOCUMENTED_REPLIES])
def test_parse_documented_replies(chat_format, reference, doc, title, tools, expected):
    from llama_models.datatypes import StopReason

    text = documented(doc, title, "Model Response Format")
    text = text.removesuffix("<|eom_id|>").removesuffix("<|eot_id|>")  # the engine gives the text before the stop token
    message = chat_format.parse_reply(text, tools)
    assert message["content"] == "" and calls_of(message) == expected
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in message["tool_calls"])
    assert len({c["id"] for c in message["tool_calls"]}) == len(expected)
    # llama-models reads the first call alike.
    (first,) = reference.decode_assistant_message_from_content(text, StopReason.end_of_turn).tool_calls
    assert (getattr(first.tool_name, "value", first.tool_name), first.arguments) == expected[0]


def test_parse_code_interpreter(chat_format):
    text = documented("llama3_1/prompt_format.md", "Builtin Code Interpreter", "Model Response Format")
    text = text.removesuffix("<|eom_id|>")
    message = chat_format.parse_reply(text, [{"type": "code_interpreter"}])
    assert calls_of(message) == [("code_interpreter", {"code": text.removeprefix("<|python_tag|>")})]
    # Code is a call only where the prompt offered the code interpreter.
    assert chat_format.parse_reply(text, [GET_WEATHER]) == {"role": "assistant", "content": text, "tool_calls": []}


ARGUMENTS = {"q": 'say "hi" \\ naïve\n東京', "n": 3, "x": 2.5, "ok": True, "none": None, "list": [1, "a", [False]],
             "obj": {"k": "v", "nested": {"a": [1]}}}


@pytest.mark.parametrize("tool_format", ["llama3.1", "llama3.2"])
def test_round_trip_llama3(chat_format, tokenizer, tool_format):
    """Calls written into an assistant turn are read back from its text."""
    tools = [*BUILTINS, GET_WEATHER, TRENDING_SONGS]
    for calls in ([("get_weather", ARGUMENTS)], [("get_weather", {"city": "SF"}), ("trending_songs", ARGUMENTS)],
                  [("brave_search", {"query": 'the "best" café'})], [("wolfram_alpha", {"query": "2+2"})]):
        message = {"role": "assistant", "content": None, "tool_calls": [call(n, a) for n, a in calls]}
        ids = chat_format.encode_message(message, tool_format)
        header = len(chat_format.encode_header(message))
        reply = chat_format.parse_reply(tokenizer.decode(ids[header:-1]), tools, tool_format)
        assert calls_of(reply) == calls and reply["content"] == ""


def test_round_trip_hermes():
    tools = normalize_tools([GET_WEATHER, TRENDING_SONGS], "hermes")
    calls = [("get_weather", ARGUMENTS), ("trending_songs", {"n": 2})]
    (text,) = render_calls("hermes", calls)
    reply = parse_reply("Let me check.\n" + text, tools, "hermes")
    assert calls_of(reply) == calls and reply["content"] == "Let me check."
    # A string may hold the closing tag: the block's JSON is read as JSON.
    tricky = [("get_weather", {"city": "</tool_call> <tool_call>"}), ("trending_songs", {"n": 2})]
    reply = parse_reply("Sure. " + render_calls("hermes", tricky)[0] + " Done.", tools, "hermes")
    assert calls_of(reply) == tricky and reply["content"] == "Sure. \n Done."  # the text between the blocks stays
    # SmolLM2 writes a list of calls in one block; the closing tag may be cut off.
    reply = parse_reply('<tool_call>[{"name": "get_weather", "arguments": {"city": "SF"}}, '
                        '{"name": "trending_songs", "arguments": "{\\"n\\": 1}"}]', tools, "hermes")
    assert calls_of(reply) == [("get_weather", {"city": "SF"}), ("trending_songs", {"n": 1})]


MALFORMED_LLAMA3 = [
    '<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": }',
    '{"name": "trending_songs", "parameters": {"n": 1}} and some words',
    '{"answer": 42}',
    '<function=trending_songs>{"n": 1</function>',
    "brave_search.call(query=latest gold price)",
    "unknown_tool.call(query=\"x\")",
    '[get_weather(city=open("/etc/passwd").read())]',  # not a literal: never evaluated
    '[__import__("os").system("echo pwned")]',
    '[get_weather("Paris")]',  # positional
    "[get_weather(**{'city': 'Paris'})]",
    "[get_weather(city={1, 2})]",  # a set is no JSON
    "[]",
    "[1, 2, 3]",
    "<|python_tag|>print('no code interpreter offered')",
    "The weather in Paris is sunny.",
]


@pytest.mark.parametrize("text", MALFORMED_LLAMA3)
def test_malformed_llama3_calls_are_content(chat_format, text):
    for tool_format in ("llama3.1", "llama3.2"):
        reply = chat_format.parse_reply(text, [*BUILTINS, GET_WEATHER, TRENDING_SONGS], tool_format)
        assert reply == {"role": "assistant", "content": text, "tool_calls": []}


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {city: "SF"}}\n</tool_call>',
    '<tool_call>{"arguments": {"city": "SF"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call><tool_call>[1]</tool_call>',
    "<tool_call>[]</tool_call>",
    "No tool needed.",
])
def test_malformed_hermes_calls_are_content(text):
    assert parse_reply(text, normalize_tools([GET_WEATHER], "hermes"), "hermes") == {
        "role": "assistant", "content": text, "tool_calls": []}


def test_without_tools_nothing_is_parsed(chat_format):
    text = '<|python_tag|>brave_search.call(query="x")'
    assert chat_format.parse_reply(text) == {"role": "assistant", "content": text, "tool_calls": []}


# --- Stop reasons -------------------------------------------------------------------------------


def test_stop_reasons(chat_format, tokenizer):
    assert chat_format.stop_reason(tokenizer.special_tokens["<|eom_id|>"]) == "eom"
    assert chat_format.stop_reason(tokenizer.special_tokens["<|eot_id|>"]) == "eot"
    assert chat_format.stop_reason(tokenizer.encode("x", bos=False, eos=False)[0]) is None
    called = chat_format.parse_reply('brave_search.call(query="x")', BUILTINS)
    assert finish_reason(called, "stop") == "tool_calls"
    assert finish_reason(called, "length") == "length"
    assert finish_reason(chat_format.parse_reply("Hi.", BUILTINS), "stop") == "stop"


# --- tool_choice, plain dialogs, errors ---------------------------------------------------------


def test_tool_choice(chat_format, tokenizer):
    dialog = [{"role": "user", "content": "Hi"}]
    plain = chat_format.encode_dialog_prompt(dialog)
    assert chat_format.encode_dialog_prompt(dialog, tools=None) == plain
    assert chat_format.encode_dialog_prompt(dialog, tools=[]) == plain
    assert chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_choice="none") == plain
    required = tokenizer.decode(chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_choice="required",
                                                                 today=TODAY))
    assert "Today Date: 21 September 2024\nYou MUST use one of the provided functions/tools" in required
    named = {"type": "function", "function": {"name": "get_weather"}}
    prompt = tokenizer.decode(chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_choice=named,
                                                               tool_format="llama3.2"))
    # As llama-stack merges it: a blank line where the dialog's own system prompt would go.
    assert prompt.split("<|eot_id|>")[0].endswith("]\n\nYou MUST use the tool `get_weather` to answer the user query.")
    with pytest.raises(ValueError, match="not among the tools"):
        chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_choice={"type": "function",
                                                                                  "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        chat_format.encode_dialog_prompt(dialog, tool_choice="required")
    with pytest.raises(ValueError, match="tool_choice must be"):
        chat_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER], tool_choice="always")


def test_llama32_merges_the_system_prompt(chat_format, tokenizer):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.decode(chat_format.encode_dialog_prompt(dialog, tools=[BUILTINS[0], GET_WEATHER],
                                                               tool_format="llama3.2"))
    system = documented_messages(prompt)[0][1]
    assert system.startswith("Environment: ipython\nTools: brave_search\nYou are an expert in composing functions.")
    assert system.endswith("\n]\nBe brief.")


@pytest.mark.parametrize("tools, error", [
    ({"type": "function"}, "must be a list"),
    (["get_weather"], "must be a dict with a 'type'"),
    ([{"type": "retrieval"}], "expected 'function' or a built-in"),
    ([{"type": "function", "function": {"description": "no name"}}], r"must be a dict with a 'name'"),
    ([{"type": "function", "function": {"name": "has space"}}], "letters, digits"),
    ([GET_WEATHER, GET_WEATHER], "unique"),
    ([{"type": "function", "function": {"name": "brave_search"}}], "built-in tool's name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "JSON schema of an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {}, "required": ["x"]}}}],
     "must list names"),
])
def test_bad_tools(chat_format, tools, error):
    with pytest.raises(ValueError, match=error):
        chat_format.encode_dialog_prompt([{"role": "user", "content": "Hi"}], tools=tools)


def test_bad_dialogs(chat_format):
    user = {"role": "user", "content": "Hi"}
    with pytest.raises(ValueError, match="only assistant messages call tools"):
        chat_format.encode_dialog_prompt([{**user, "tool_calls": [call("f", {})]}])
    bad_json = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    with pytest.raises(ValueError, match=r"message 1 tool_calls\[0\] arguments are not valid JSON"):
        chat_format.encode_dialog_prompt([user, {"role": "assistant", "content": None, "tool_calls": [bad_json]}])
    with pytest.raises(ValueError, match="needs its query"):
        chat_format.encode_dialog_prompt([user, {"role": "assistant", "content": None,
                                                 "tool_calls": [call("brave_search", {"q": "x"})]}])
    with pytest.raises(ValueError, match="Python identifier"):
        chat_format.encode_dialog_prompt([user], tools=[{"type": "function", "function": {"name": "get-weather"}}],
                                         tool_format="llama3.2")
    with pytest.raises(ValueError, match="tool_format 'hermes' is not one"):
        chat_format.encode_dialog_prompt([user], tools=[GET_WEATHER], tool_format="hermes")
    with pytest.raises(ValueError, match="empty content"):
        chat_format.encode_dialog_prompt([{"role": "assistant", "content": ""}])
    # A tool may return nothing.
    assert chat_format.encode_dialog_prompt([user, {"role": "tool", "content": ""}])


# --- Hermes (ChatML) ----------------------------------------------------------------------------

HERMES_SYSTEM = (
    "Be terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(GET_WEATHER, ensure_ascii=False) + "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def test_hermes_system_prompt():
    assert render_tool_prompt("hermes", normalize_tools([GET_WEATHER], "hermes"), "Be terse.").system == HERMES_SYSTEM
    with pytest.raises(ValueError, match="function tools only"):
        normalize_tools(BUILTINS, "hermes")


@pytest.fixture(scope="module")
def smollm2_format():
    """The bundled SmolLM2's chat format, if the model is provisioned here."""
    from llama.default_model import DEFAULT_MODEL_NAME, checkpoints_dir

    path = checkpoints_dir() / DEFAULT_MODEL_NAME / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"the bundled SmolLM2 is not provisioned ({path})")
    return make_chat_format(load_tokenizer(path))


def test_hermes_dialog(smollm2_format):
    dialog = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather in SF and Seattle?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "SF"}),
                                                              call("get_weather", {"city": "Seattle"}, id="call_2")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12 C"},
    ]
    ids = smollm2_format.encode_dialog_prompt(dialog, tools=[GET_WEATHER])
    assert smollm2_format.tokenizer.decode(ids) == (
        f"<|im_start|>system\n{HERMES_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWeather in SF and Seattle?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seattle"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n12 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without tools the prompt is the plain ChatML one; its default system prompt is the one tools extend.
    plain = [{"role": "user", "content": "Hi"}]
    assert smollm2_format.encode_dialog_prompt(plain, tools=None) == smollm2_format.encode_dialog_prompt(plain)
    text = smollm2_format.tokenizer.decode(smollm2_format.encode_dialog_prompt(plain, tools=[GET_WEATHER]))
    assert text.startswith(f"<|im_start|>system\n{smollm2_format.default_system_prompt}\n\n# Tools\n")
    im_end = smollm2_format.tokenizer.special_tokens["<|im_end|>"]
    assert smollm2_format.stop_reason(im_end) == "eot"


def test_llama2_has_no_tools():
    formatter = Llama2ChatFormat(tokenizer=None)
    assert formatter.tool_formats == ()
    with pytest.raises(ValueError, match="no tool calls"):
        formatter.encode_dialog_prompt([{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": None, "tool_calls": [call("f", {})]},
                                        {"role": "user", "content": "Hi"}])


# --- Streaming: content as it becomes final, calls at the end -------------------------------------

STREAMED_LLAMA3 = [
    '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "SF"}}',
    '{"name": "get_weather", "parameters": {"city": "SF"}}; {"name": "trending_songs", "parameters": {"n": 1}}',
    '<|python_tag|>brave_search.call(query="gold price")',
    '[get_weather(city="Paris"), trending_songs(n=2)]',
    '  <function=get_weather>{"city": "SF"}</function>',
    "The weather in Paris is sunny.",
    " \n Hello",
    *MALFORMED_LLAMA3,
]
STREAMED_HERMES = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>\nDone <tool',
    "Sunny, 18 C. <tool_ca",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {}} trailing</tool_call>',
    "  leading white space, no call",
    'Broken <tool_call>{"name": "get_weather", "arguments": {city}}</tool_call> call',
    "No tool needed.",
]


def stream_reply(text, tools, tool_format, pieces):
    """(content pieces returned before the end, the rest, the calls) of `text` pushed in `pieces`."""
    stream = ToolCallStream(tools, tool_format)
    early = [stream.push(piece) for piece in pieces]
    rest, calls = stream.finish()
    return early, rest, calls


@pytest.mark.parametrize("tool_format, text", [("llama3.1", t) for t in STREAMED_LLAMA3]
                         + [("hermes", t) for t in STREAMED_HERMES])
def test_streamed_reply_is_the_parsed_reply(tokenizer, tool_format, text):
    """Pushed character by character or token by token, the content pieces join to parse_reply's
    content and the calls are its calls."""
    tools = normalize_tools([GET_WEATHER, TRENDING_SONGS] + (BUILTINS if tool_format != "hermes" else []),
                            tool_format)
    expected = parse_reply(text, tools, tool_format)
    token_pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text, bos=False, eos=False, allowed_special="all")]
    for pieces in (list(text), token_pieces):
        early, rest, calls = stream_reply(text, tools, tool_format, pieces)
        assert "".join(early) + rest == expected["content"]
        assert calls_of({"tool_calls": calls}) == calls_of(expected)


def test_plain_content_streams_before_the_end():
    for tool_format, text in (("llama3.1", "The weather in Paris is sunny."),
                              ("hermes", "Sunny, 18 C. Anything else?")):
        tools = normalize_tools([GET_WEATHER], tool_format)
        early, rest, _ = stream_reply(text, tools, tool_format, list(text))
        assert "".join(early[:-1]).startswith(text[:10])  # sent while the reply was still coming


# --- Forcing a call -----------------------------------------------------------------------------

WEATHER_AND_TIME = [GET_WEATHER, {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]},
                                                    "seconds": {"type": "boolean"}},
                   "required": ["zone"]}}}]


def accepts(grammar, tokenizer, ids) -> bool:
    """Whether the grammar's masks allow every token of ids, one after the other, then a stop token."""
    from llama.grammar import logit_masks

    state = grammar.start(1)
    for token in ids:
        [masks] = logit_masks([(state, [True])], tokenizer.n_words, "cpu")
        if masks[0, token] != 0:
            return False
        state.advance([token], [True])
    [masks] = logit_masks([(state, [True])], tokenizer.n_words, "cpu")
    return bool((masks[0, tokenizer.stop_tokens] == 0).all())


@pytest.mark.parametrize("tool_format", ["llama3.1", "llama3.2"])
def test_forced_llama3_call(tokenizer, tool_format):
    pytest.importorskip("llguidance")
    from llama.grammar import Grammar

    tools = normalize_tools([*WEATHER_AND_TIME, *BUILTINS], tool_format)
    assert forced_call_grammar(tools, "auto", tool_format) is None
    assert forced_call_grammar(tools, "none", tool_format) is None
    required = Grammar.lark(forced_call_grammar(tools, "required", tool_format), tokenizer)
    named = Grammar.lark(forced_call_grammar(tools, {"type": "function", "function": {"name": "get_time"}},
                                             tool_format), tokenizer)
    weather = '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "SF"}}'
    time = '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {"zone": "CET", "seconds": true}}'
    search = '<|python_tag|>brave_search.call(query="gold \\"price\\"")'
    for text, by_required, by_named in ((weather, True, False), (time, True, True), (search, True, False),
                                        ('<|python_tag|>{"type": "function", "name": "get_time", '
                                         '"parameters": {"zone": "PST"}}', False, False),
                                        ('{"type": "function", "name": "get_weather", "parameters": {"city": "SF"}}',
                                         False, False)):
        ids = tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
        assert accepts(required, tokenizer, ids) == by_required, text
        assert accepts(named, tokenizer, ids) == by_named, text
        if by_required:
            assert len(parse_reply(text, tools, tool_format)["tool_calls"]) == 1


def test_forced_hermes_calls(smollm2_format):
    pytest.importorskip("llguidance")
    from llama.grammar import Grammar

    tokenizer = smollm2_format.tokenizer
    tools = normalize_tools(WEATHER_AND_TIME, "hermes")
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    five = "\n".join([one] * 5)  # more than MAX_FORCED_CALLS
    extra = one.replace('"SF"', '"SF", "country": "US"')  # an argument the parameters do not declare
    parallel = Grammar.lark(forced_call_grammar(tools, "required", "hermes", parallel_tool_calls=True), tokenizer)
    single = Grammar.lark(forced_call_grammar(tools, "required", "hermes", parallel_tool_calls=False), tokenizer)
    for text, by_parallel, by_single in ((one, True, True), (two, True, False), ("\n".join([one] * 4), True, False),
                                         (five, False, False), (extra, False, False),
                                         (one.replace('"city"', '"town"'), False, False), ("Sunny.", False, False)):
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert accepts(parallel, tokenizer, ids) == by_parallel, text
        assert accepts(single, tokenizer, ids) == by_single, text
    assert calls_of(parse_reply(two, tools, "hermes")) == [("get_weather", {"city": "SF"}),
                                                           ("get_time", {"zone": "UTC"})]


def test_forced_call_strings_are_bounded(smollm2_format):
    """A string argument with no bound of its own ends within MAX_FORCED_STRING characters in a forced
    call; a schema's own bound (or enum, pattern) is kept."""
    pytest.importorskip("llguidance")
    from llama.grammar import Grammar
    from llama.tools import MAX_FORCED_STRING, bounded_strings

    tokenizer = smollm2_format.tokenizer
    tools = normalize_tools(WEATHER_AND_TIME, "hermes")
    grammar = Grammar.lark(forced_call_grammar(tools, "required", "hermes"), tokenizer)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    for length, accepted in ((MAX_FORCED_STRING, True), (MAX_FORCED_STRING + 1, False)):
        ids = tokenizer.encode(call % ("a" * length), bos=False, eos=False)
        assert accepts(grammar, tokenizer, ids) == accepted
    schema = {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "string", "maxLength": 5000}, "c": {"enum": ["x", "y"]},
        "d": {"type": "array", "items": {"type": ["string", "null"]}}}}
    assert bounded_strings(schema)["properties"] == {
        "a": {"type": "string", "maxLength": MAX_FORCED_STRING}, "b": {"type": "string", "maxLength": 5000},
        "c": {"enum": ["x", "y"]},
        "d": {"type": "array", "items": {"type": ["string", "null"], "maxLength": MAX_FORCED_STRING}}}


# --- The library: chat_completion and stream with tools ------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, llama3_tokenizer_path):
    from llama import Llama

    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=640, max_batch_size=4)


ASK = [{"role": "user", "content": "What time is it in Paris?"}]
# For a random model sampling at temperature 1: its strings end only where the schema bounds them.
BOUNDED_TOOLS = [{"type": "function", "function": {**GET_WEATHER["function"], "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}},
    WEATHER_AND_TIME[1]]


def assert_valid_calls(message, tools, names=None):
    """Every call names one of the tools (or of `names`), with arguments valid against its parameters."""
    jsonschema = pytest.importorskip("jsonschema")
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert message["tool_calls"]
    for call_ in message["tool_calls"]:
        assert call_["type"] == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call_["id"])
        assert call_["function"]["name"] in (names or parameters)
        jsonschema.validate(json.loads(call_["function"]["arguments"]), parameters[call_["function"]["name"]])


def test_chat_completion_forces_valid_calls(generator):
    """A random model, sampling at temperature 1, calls a given function with valid arguments
    when tool_choice requires it; its turn ends with a stop token."""
    pytest.importorskip("llguidance")
    results = generator.chat_completion([ASK, ASK], temperature=1.0, top_p=1.0, max_gen_len=200, n=2, seed=0,
                                        tools=BOUNDED_TOOLS, tool_choice="required")
    for result in results:
        assert_valid_calls(result["generation"], BOUNDED_TOOLS)
        assert result["generation"]["content"] == "" and result["stop_reason"] in ("eom", "eot")
    named = {"type": "function", "function": {"name": "get_time"}}
    [result] = generator.chat_completion([ASK], temperature=1.0, max_gen_len=200, seed=1, tools=BOUNDED_TOOLS,
                                         tool_choice=named)
    assert_valid_calls(result["generation"], BOUNDED_TOOLS, names=["get_time"])


def test_stream_with_tools_is_chat_completion(generator):
    pytest.importorskip("llguidance")
    options = dict(temperature=1.0, top_p=1.0, max_gen_len=200, seed=5, tools=BOUNDED_TOOLS, tool_choice="required")
    [result] = generator.chat_completion([ASK], **options)
    pieces = list(generator.stream(ASK, **options))
    assert "".join(p for p in pieces if isinstance(p, str)) == result["generation"]["content"]
    assert calls_of({"tool_calls": [p for p in pieces if isinstance(p, dict)]}) == calls_of(result["generation"])


def test_chat_completion_with_tools_but_free_choice(generator):
    """tool_choice "auto" samples freely (a random model's gibberish is content); "none" shows no tools."""
    [auto] = generator.chat_completion([ASK], temperature=0, max_gen_len=6, tools=BOUNDED_TOOLS)
    assert set(auto) == {"generation", "stop_reason"} and auto["stop_reason"] in ("length", "eom", "eot")
    assert set(auto["generation"]) == {"role", "content", "tool_calls"}
    [none] = generator.chat_completion([ASK], temperature=0, max_gen_len=6, tools=BOUNDED_TOOLS, tool_choice="none")
    [plain] = generator.chat_completion([ASK], temperature=0, max_gen_len=6)
    assert none["generation"]["content"] == plain["generation"]["content"] and none["generation"]["tool_calls"] == []


def test_tool_errors(generator):
    pytest.importorskip("llguidance")
    with pytest.raises(ValueError, match="cannot enforce these tools' parameters: .*int"):
        generator.chat_completion([ASK], tools=[TRENDING_SONGS], tool_choice="required")  # "type": "int"
    with pytest.raises(ValueError, match="cannot be combined with json_schema"):
        generator.chat_completion([ASK], tools=BOUNDED_TOOLS, tool_choice="required", json_schema={"type": "object"})
    with pytest.raises(ValueError, match="not one this model's chat format writes"):
        generator.chat_completion([ASK], tools=BOUNDED_TOOLS, tool_format="hermes")
    with pytest.raises(ValueError, match="tools need a dialog"):
        list(generator.stream("Hello", tools=BOUNDED_TOOLS))


def test_bundled_model_forced_hermes_calls(bundled_model):
    """SmolLM2 (ChatML, Hermes calls) with tool_choice "required": well-formed calls to the given functions."""
    pytest.importorskip("llguidance")
    from llama import Llama

    ckpt_dir, tokenizer_path = bundled_model
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=512, max_batch_size=2)
    results = llama.chat_completion([ASK], temperature=1.0, top_p=1.0, max_gen_len=120, seed=0,
                                    tools=WEATHER_AND_TIME, tool_choice="required")
    for result in results:
        assert_valid_calls(result["generation"], WEATHER_AND_TIME)
        assert result["stop_reason"] == "eot"

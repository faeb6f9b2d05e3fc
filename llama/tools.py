"""Tool calling: tool definitions in, tool calls out.

A caller describes its tools as OpenAI does::

    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

and Meta's built-in tools (Llama 3 only) by their type alone: {"type": "brave_search"},
{"type": "wolfram_alpha"}, {"type": "code_interpreter"}. This module writes the
tools into the prompt's text and reads the model's calls back out of its reply,
in one of three styles, `TOOL_FORMATS`:

- "llama3.1", Meta's Llama 3.1 format as llama-models' `LLama31Interface` builds
  it (llama_models/llama3_1/prompt_format.md shows it): the system prompt opens
  with "Environment: ipython", a "Tools: brave_search, wolfram_alpha" line for
  the built-ins and the date lines; the functions are listed in JSON in a user
  message right after it. The model calls `{"type": "function", "name": ...,
  "parameters": {...}}` or `<function=name>{...}</function>`, and the built-ins
  as `brave_search.call(query="...")`, after <|python_tag|>; code after
  <|python_tag|> is a code_interpreter call. Earlier calls in the dialog are
  written back as llama-models' ChatFormat writes them: <|python_tag|> before
  code only.
- "llama3.2", Llama 3.2's pythonic format (its 1B and 3B instruct models; see
  llama_models/llama3_2/text_prompt_format.md): the functions are listed in JSON
  in the system prompt, and the model calls `[get_weather(city="Paris"), ...]`;
  built-ins as in 3.1. The system prompt is merged as llama-stack merges it.
- "hermes", for ChatML models such as the bundled SmolLM2: our choice, the
  widely used Hermes convention as Qwen2.5's chat template writes it: the tools
  as JSON lines within <tools></tools> in the system prompt, each call as
  <tool_call>{"name": ..., "arguments": {...}}</tool_call>, tool results as
  <tool_response></tool_response> blocks in a user turn.

One parser reads every Llama 3 syntax above, whichever of the two Llama styles
wrote the prompt: a model may answer in the other's syntax. A reply is parsed into
OpenAI's shape, {"role": "assistant", "content": str, "tool_calls": [...]}; each
call gets a fresh random id, "call_" and 24 hex digits (uuid4), and its
arguments as a JSON string. A reply that does not parse as calls, in whole, is
returned as content with no tool calls: malformed calls never raise.

Meta's templates insert names and descriptions verbatim into JSON-looking text;
we write them as JSON strings, the same text unless they hold quotes,
backslashes or control characters. Where llama-models writes several pythonic
calls as several lists (`[f()][g()]`), we write one (`[f(), g()]`), which is
what the model emits.
"""

import ast
import json
import keyword
import re
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, TypedDict, Union

TOOL_FORMATS = ("llama3.1", "llama3.2", "hermes")
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
PYTHON_TAG = "<|python_tag|>"  # Llama 3: the reply is a tool call

# (name, arguments): a call as the formats write and read it.
Call = Tuple[str, Dict[str, Any]]


class FunctionCall(TypedDict):
    name: str
    arguments: str  # a JSON object


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str  # the text beside the calls ("" when the reply is calls only)
    tool_calls: List[ToolCall]  # empty when the reply calls no tool


@dataclass
class ToolPrompt:
    """The messages that show the tools to the model."""

    system: str  # the whole system message, the dialog's own system prompt merged in
    user: Optional[str] = None  # a user message right after it (Llama 3.1's functions)


# --- Tool definitions in ------------------------------------------------------------------------

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def normalize_tools(tools: Optional[Sequence[dict]], tool_format: str) -> List[dict]:
    """The tools checked, as {"type": "function", "function": {"name", "description",
    "parameters"}} or {"type": <built-in>}; [] for None.

    Raises:
        ValueError: a malformed definition, a repeated name, a built-in tool in
            the Hermes format, or (llama3.2) a name that is no Python identifier.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    normalized, names = [], set()
    for i, tool in enumerate(tools):
        tool = _normalize_tool(f"tools[{i}]", tool, tool_format)
        name = tool_name(tool)
        if name in names:
            raise ValueError(f"tools[{i}]: a second tool named {name!r}; tool names must be unique")
        names.add(name)
        normalized.append(tool)
    return normalized


def tool_name(tool: dict) -> str:
    """The name a normalized tool is called by."""
    return tool["function"]["name"] if tool["type"] == "function" else tool["type"]


def _normalize_tool(where: str, tool, tool_format: str) -> dict:
    if not isinstance(tool, dict) or "type" not in tool:
        raise ValueError(
            f"{where} must be a dict with a 'type', e.g. {{'type': 'function', 'function': {{'name': 'f'}}}}; "
            f"got {tool!r}"
        )
    if tool["type"] in BUILTIN_TOOLS:
        if tool_format == "hermes":
            raise ValueError(
                f"{where}: {tool['type']} is a built-in tool of Meta's Llama 3 formats; "
                f"the {tool_format} format takes function tools only"
            )
        return {"type": tool["type"]}
    if tool["type"] != "function":
        raise ValueError(
            f"{where} has type {tool['type']!r}; expected 'function' or a built-in tool ({', '.join(BUILTIN_TOOLS)})"
        )
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where}['function'] must be a dict with a 'name' (a str), got {function!r}")
    name = function["name"]
    if not _FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"{where}: function name {name!r} must be 1 to 64 letters, digits, '_' or '-'")
    if tool_format != "hermes" and name in BUILTIN_TOOLS:
        raise ValueError(f"{where}: {name!r} is a built-in tool's name: declare it as {{'type': {name!r}}}")
    if tool_format == "llama3.2" and (not name.isidentifier() or keyword.iskeyword(name)):
        raise ValueError(f"{where}: Llama 3.2 calls functions in Python syntax: {name!r} must be a Python identifier")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: the description must be a str, got {type(description).__name__}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    _check_parameters(where, parameters)
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _check_parameters(where: str, parameters) -> None:
    """Raises ValueError unless `parameters` is a JSON schema of an object, as OpenAI's tools take."""
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ValueError(f"{where}: parameters must be a JSON schema of an object ({{'type': 'object', ...}})")
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
        raise ValueError(f"{where}: parameters['properties'] must map each parameter's name to its schema (a dict)")
    required = parameters.get("required", [])
    if not isinstance(required, list) or any(name not in properties for name in required):
        raise ValueError(
            f"{where}: parameters['required'] must list names of parameters['properties'], got {required!r}"
        )


def apply_tool_choice(tools: List[dict], tool_choice: Union[str, dict] = "auto") -> Tuple[List[dict], Optional[str]]:
    """(the tools to show the model, the line tool_choice adds to the system prompt or None).

    tool_choice as OpenAI takes it: "auto" (the model decides), "none" (no tools
    shown), "required" (some tool must be called) or {"type": "function",
    "function": {"name": ...}} (that one must). Meta's models have no constrained
    decoding for it: "required" and a named tool are asked for in words, as llama-stack does.
    """
    if tool_choice == "auto":
        return tools, None
    if tool_choice == "none":
        return [], None
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools: pass tools=[...] or leave tool_choice 'auto'")
    if tool_choice == "required":
        return tools, "You MUST use one of the provided functions/tools to answer the user query."
    is_named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    function = tool_choice.get("function") if is_named else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(
            f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}; "
            f"got {tool_choice!r}"
        )
    names = [tool_name(tool) for tool in tools]
    if function["name"] not in names:
        raise ValueError(f"tool_choice names {function['name']!r}, which is not among the tools ({', '.join(names)})")
    return tools, f"You MUST use the tool `{function['name']}` to answer the user query."


# --- Forcing a call -----------------------------------------------------------------------------

# Most calls in a forced Hermes reply: a small model, once it has called, may go on calling
# until the length limit cuts its reply (and so its calls) short.
MAX_FORCED_CALLS = 4
# Most characters of a string argument whose schema sets no bound of its own, in a forced call:
# sampled at temperature 1, a small model can write a string on and on until the length limit
# cuts the call short (measured: 1 of 50 SmolLM2 replies at max_tokens 400).
MAX_FORCED_STRING = 200


def bounded_strings(schema, max_length: int = MAX_FORCED_STRING):
    """The schema with maxLength max_length on every string that has no maxLength, enum, const or
    pattern of its own (what it accepts is a subset of the original's)."""
    if isinstance(schema, list):
        return [bounded_strings(item, max_length) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_strings(value, max_length) for key, value in schema.items()}
    types = schema.get("type")
    if (types == "string" or (isinstance(types, list) and "string" in types)) and not (
            {"maxLength", "enum", "const", "pattern"} & schema.keys()):
        bounded["maxLength"] = max_length
    return bounded


def forced_call_grammar(tools: List[dict], tool_choice: Union[str, dict], tool_format: str,
                        parallel_tool_calls: bool = True) -> Optional[str]:
    """The grammar (Lark, in llguidance's dialect: `llama.grammar.Grammar.lark`) of a reply that
    calls what tool_choice demands: one of `tools` for "required", the named one for
    {"type": "function", "function": {"name": ...}}; None for "auto" and "none" (nothing forced).

    The reply is the call alone, its arguments valid against the function's parameters and,
    unless the parameters' schema says otherwise (additionalProperties), holding only those it declares,
    their strings at most MAX_FORCED_STRING characters where the schema sets no bound (`bounded_strings`):
    - hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, and with
      parallel_tool_calls up to MAX_FORCED_CALLS such blocks, one per line, as the model chooses;
    - llama3.1 and llama3.2: one call (Meta's formats call one tool at a time), a function as
      Llama 3.1's documented reply writes it, <|python_tag|>{"type": "function", "name": ...,
      "parameters": {...}}; Llama 3.2 too, since its pythonic calls take Python literals, which a
      JSON schema does not describe (`parse_reply` reads both). brave_search and wolfram_alpha as
      <|python_tag|>brave_search.call(query="..."), code_interpreter as <|python_tag|> and code.

    Args:
        tools: from `apply_tool_choice`, whose checks tool_choice has passed.
    """
    if tool_choice in ("auto", "none"):
        return None
    from llama.grammar import json_rule  # forcing a call is constrained decoding: llguidance

    if isinstance(tool_choice, dict):
        tools = [tool for tool in tools if tool_name(tool) == tool_choice["function"]["name"]]
    alternatives = []
    for tool in tools:
        if tool["type"] == "code_interpreter":
            alternatives.append("<|python_tag|> /(?s:.+)/")
        elif tool["type"] in BUILTIN_TOOLS:
            alternatives.append(f'<|python_tag|> "{tool["type"]}.call(query=" {json_rule({"type": "string"})} ")"')
        else:
            function = tool["function"]
            parameters = bounded_strings({"additionalProperties": False, **function["parameters"]})
            keys = {"name": {"const": function["name"]}, "arguments": parameters}
            if tool_format != "hermes":
                keys = {"type": {"const": "function"}, "name": keys["name"], "parameters": parameters}
            call = json_rule({"type": "object", "properties": keys, "required": list(keys),
                              "additionalProperties": False})
            alternatives.append(f'"<tool_call>\\n" {call} "\\n</tool_call>"' if tool_format == "hermes"
                                else f"<|python_tag|> {call}")
    several = tool_format == "hermes" and parallel_tool_calls
    start = f'call ("\\n" call){{0,{MAX_FORCED_CALLS - 1}}}' if several else "call"
    return f"start: {start}\ncall: " + "\n    | ".join(alternatives) + "\n"


# --- The prompt ---------------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # not strftime's %B, which follows the locale

LLAMA31_FUNCTIONS_INTRO = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)
LLAMA31_FUNCTIONS_OUTRO = "\nReturn function calls in JSON format."
# One function as Meta's template lays it out: every parameter listed as an
# object of its own, with "type": "object" whatever its type.
LLAMA31_FUNCTION = """\
{{
    "type": "function",
    "function": {{
        "name": {name},
        "description": {description},
        "parameters": {{
            "type": "object",
            "properties": [{properties}
            ],
            "required": {required}
        }}
    }}
}}
"""
LLAMA31_PARAMETER = """
                {{
                    {name}: {{
                        "type": "object",
                        "description": {description}
                    }}
                }}"""

LLAMA32_FUNCTIONS_INTRO = """\
You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of \
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

"""

HERMES_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
HERMES_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


def render_tool_prompt(
    tool_format: str,
    tools: List[dict],
    system: Optional[str] = None,
    instruction: Optional[str] = None,
    today: Optional[date] = None,
) -> ToolPrompt:
    """The system message (and, for Llama 3.1's functions, the user message after it) that show `tools`.

    Args:
        tool_format: one of `TOOL_FORMATS`.
        tools: from `normalize_tools`, not empty.
        system: the dialog's own system prompt, merged in.
        instruction: `apply_tool_choice`'s line.
        today: the "Today Date" of Llama 3.1's prompt (default: today).
    """
    builtins = [tool["type"] for tool in tools if tool["type"] in BUILTIN_TOOLS]
    functions = [tool["function"] for tool in tools if tool["type"] == "function"]
    if tool_format == "llama3.1":  # as llama-models' LLama31Interface.system_messages
        text = _environment(builtins) + "\n" + _dates(today or date.today())
        if system:
            text += "\n\n" + system
        if instruction:
            text += "\n" + instruction
        if not functions:
            return ToolPrompt(text + "\n")
        user = LLAMA31_FUNCTIONS_INTRO + "".join(map(_llama31_function, functions)) + LLAMA31_FUNCTIONS_OUTRO
        return ToolPrompt(text + "\n", user)
    if tool_format == "llama3.2":  # as llama-stack's augment_messages_for_tools_llama_3_2
        text = _environment(builtins) + "\n" if builtins else ""
        if functions:
            text += LLAMA32_FUNCTIONS_INTRO + _json([_llama32_function(f) for f in functions], indent=4) + "\n"
        text += system or ""
        if instruction:
            text += "\n" + instruction
        return ToolPrompt(text.strip("\n"))
    if tool_format == "hermes":
        text = HERMES_TOOLS_INTRO + "\n".join(_json(tool) for tool in tools) + HERMES_TOOLS_OUTRO
        if system:
            text = system + "\n\n" + text
        if instruction:
            text += "\n\n" + instruction
        return ToolPrompt(text)
    raise ValueError(f"unknown tool format {tool_format!r}; known: {', '.join(TOOL_FORMATS)}")


def _environment(builtins: List[str]) -> str:
    """Meta's lines that turn tool calling on: code_interpreter needs no "Tools:" entry.
    (Without one, the text ends in a newline, with one it does not: as Meta's template renders.)"""
    named = [name for name in builtins if name != "code_interpreter"]
    return "Environment: ipython\n" + (f"Tools: {', '.join(named)}" if named else "")


def _dates(today: date) -> str:
    return f"Cutting Knowledge Date: December 2023\nToday Date: {today.day:02d} {MONTHS[today.month - 1]} {today.year}"


def _llama31_function(function: dict) -> str:
    properties = function["parameters"].get("properties", {})
    required = function["parameters"].get("required", [])
    return LLAMA31_FUNCTION.format(
        name=_json(function["name"]),
        description=_json(function["description"]),
        properties=",".join(
            LLAMA31_PARAMETER.format(name=_json(name), description=_json(schema.get("description", "")))
            for name, schema in properties.items()
        ),
        required=_json([name for name in properties if name in required]),
    )


def _llama32_function(function: dict) -> dict:
    parameters = function["parameters"]
    return {
        "name": function["name"],
        "description": function["description"],
        "parameters": {
            "type": "dict",
            "required": parameters.get("required", []),
            "properties": parameters.get("properties", {}),
        },
    }


def _json(value, indent: Optional[int] = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


# --- Calls in the dialog ------------------------------------------------------------------------


def read_tool_calls(message: dict, index: int) -> List[Call]:
    """The calls of an assistant message's "tool_calls" (OpenAI's shape: {"id", "type": "function",
    "function": {"name", "arguments": a JSON object as a str, or a dict}}).

    Raises:
        ValueError: naming message `index` and what is malformed.
    """
    calls = message["tool_calls"]
    where = f"message {index} tool_calls"
    if isinstance(calls, (str, bytes, dict)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    result = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(
                f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}, got {call!r}"
            )
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}[{j}] has type {call['type']!r}; expected 'function'")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}[{j}] arguments are not valid JSON ({e}): {function['arguments']!r}") from e
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}[{j}] arguments must be a JSON object, got {arguments!r}")
        result.append((function["name"], arguments))
    return result


def render_calls(tool_format: str, calls: List[Call]) -> List[str]:
    """The text of an assistant turn's calls, in pieces that llama-models tokenizes one by one.

    Raises:
        ValueError: a built-in call without its argument, a Llama 3.2 turn mixing
            built-in and function calls, or an argument with no Python literal (3.2).
    """
    if tool_format == "hermes":
        return ["\n".join(f"<tool_call>\n{_json({'name': n, 'arguments': args})}\n</tool_call>" for n, args in calls)]
    functions = [(name, args) for name, args in calls if name not in BUILTIN_TOOLS]
    if tool_format == "llama3.2" and functions:
        if len(functions) < len(calls):
            raise ValueError("a Llama 3.2 assistant turn calls either one built-in tool or functions, not both")
        return ["[" + ", ".join(f"{name}({_python_arguments(args)})" for name, args in calls) + "]"]
    return [_llama3_call(name, args) for name, args in calls]


def _llama3_call(name: str, arguments: dict) -> str:
    if name == "code_interpreter":
        if not isinstance(arguments.get("code"), str):
            raise ValueError(f"a code_interpreter call needs its code as {{'code': str}}, got {arguments!r}")
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        if not isinstance(arguments.get("query"), str):
            raise ValueError(f"a {name} call needs its query as {{'query': str}}, got {arguments!r}")
        return f"{name}.call(query={_json(arguments['query'])})"
    return json.dumps({"type": "function", "name": name, "parameters": arguments})  # llama-models' ensure_ascii


def _python_arguments(arguments: dict) -> str:
    return ", ".join(f"{name}={_python_literal(value)}" for name, value in arguments.items())


def _python_literal(value) -> str:
    """`value` (from JSON) as a Python literal: strings in double quotes, True, None, ..."""
    if isinstance(value, str):
        return _json(value)  # a JSON string is a Python string literal of the same text
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_python_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"a Llama 3.2 call argument must be JSON data, got {type(value).__name__} {value!r}")


def starts_with_python_tag(calls: List[Call]) -> bool:
    """Llama 3: the turn opens with <|python_tag|> (llama-models writes it before code only)."""
    return bool(calls) and calls[0][0] == "code_interpreter"


def ends_with_eom(tool_format: str, calls: List[Call]) -> bool:
    """Llama 3: the turn ends with <|eom_id|> (it waits for the tools' results), not <|eot_id|>.

    Llama 3.1 ends every tool-calling turn so once "Environment: ipython" is in
    the system prompt; Llama 3.2 only its built-in calls (its pythonic calls end with <|eot_id|>).
    """
    if tool_format == "llama3.1":
        return bool(calls)
    return any(name in BUILTIN_TOOLS for name, _ in calls)


def hermes_tool_results(contents: List[str]) -> str:
    """The user turn that carries consecutive tool results back to a ChatML model."""
    return "\n".join(f"<tool_response>\n{content}\n</tool_response>" for content in contents)


# --- Tool calls out -----------------------------------------------------------------------------


def parse_reply(text: str, tools: List[dict], tool_format: str) -> AssistantMessage:
    """The assistant message of a generated reply, its calls read out.

    Args:
        text: the reply's text, as decoded (<|python_tag|> may open it).
        tools: the tools the prompt showed (`normalize_tools`); with none, nothing is parsed.
        tool_format: the style the prompt was written in.
    """
    content, calls = text, []
    if tools:
        if tool_format == "hermes":
            content, calls = _parse_hermes(text)
        else:
            code_interpreter = any(tool["type"] == "code_interpreter" for tool in tools)
            content, calls = _parse_llama3(text, code_interpreter)
    return {"role": "assistant", "content": content, "tool_calls": [_tool_call(name, args) for name, args in calls]}


def finish_reason(message: AssistantMessage, reason: str) -> str:
    """OpenAI's finish_reason: "tool_calls" for a reply with calls that ended on its own
    (`reason`, the engine's: "stop" or "length"), else `reason`."""
    return "tool_calls" if message["tool_calls"] and reason == "stop" else reason


def _tool_call(name: str, arguments: dict) -> ToolCall:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": _json(arguments)}}


def _parse_llama3(text: str, code_interpreter: bool) -> Tuple[str, List[Call]]:
    body = text.strip()
    python_tag = body.startswith(PYTHON_TAG)
    if python_tag:
        body = body[len(PYTHON_TAG):].strip()
    calls = _builtin_call(body) or _json_calls(body) or _function_tag_calls(body) or _pythonic_calls(body)
    if calls is None and python_tag and code_interpreter:
        calls = [("code_interpreter", {"code": body})]
    return ("", calls) if calls else (text, [])


_BUILTIN_CALL = re.compile(r'(brave_search|wolfram_alpha)\.call\(query=("(?:[^"\\]|\\.)*")\)')


def _builtin_call(body: str) -> Optional[List[Call]]:
    """`brave_search.call(query="...")`: the whole reply."""
    match = _BUILTIN_CALL.fullmatch(body)
    if match is None:
        return None
    try:
        query = json.loads(match.group(2))
    except json.JSONDecodeError:  # an escape JSON lacks: the text between the quotes as written
        query = match.group(2)[1:-1]
    return [(match.group(1), {"query": query})]


_JSON = json.JSONDecoder()


def _json_calls(body: str) -> Optional[List[Call]]:
    """One or more JSON objects {"name": ..., "parameters" (or "arguments"): {...}},
    separated by white space or ';'."""
    calls, position = [], 0
    while True:
        position = _skip(body, position, " \t\r\n;")
        if position == len(body):
            return calls or None
        try:
            value, position = _JSON.raw_decode(body, position)
        except json.JSONDecodeError:
            return None
        call = _json_call(value)
        if call is None:
            return None
        calls.append(call)


_FUNCTION_TAG = re.compile(r"<function=([A-Za-z0-9_.-]+)>")


def _function_tag_calls(body: str) -> Optional[List[Call]]:
    """One or more `<function=name>{...}</function>`."""
    calls, position = [], 0
    while position < len(body):
        match = _FUNCTION_TAG.match(body, position)
        if match is None:
            return None
        try:
            arguments, position = _JSON.raw_decode(body, _skip(body, match.end(), " \t\r\n"))
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict):
            return None
        if body.startswith("</function>", position):
            position += len("</function>")
        calls.append((match.group(1), arguments))
        position = _skip(body, position, " \t\r\n")
    return calls or None


def _pythonic_calls(body: str) -> Optional[List[Call]]:
    """`[f(a=1), g(b="x")]`: read with Python's parser; the values must be literals, never evaluated."""
    try:
        tree = ast.parse(body, mode="eval")
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a null byte
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        arguments = {}
        for argument in node.keywords:
            if argument.arg is None:  # **kwargs
                return None
            try:
                arguments[argument.arg] = ast.literal_eval(argument.value)
                json.dumps(arguments[argument.arg], allow_nan=False)  # JSON data only: no sets, bytes, inf
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return None
        calls.append((node.func.id, arguments))
    return calls


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _parse_hermes(text: str) -> Tuple[str, List[Call]]:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (a block may hold
    a JSON list of calls, as SmolLM2 writes them, and the reply may end before its closing
    tag); the text around them is the content. Each block's JSON is read as JSON, so a string
    in it may hold "</tool_call>"."""
    calls, content, position = [], [], 0
    while (start := text.find(_HERMES_OPEN, position)) >= 0:
        content.append(text[position:start])
        try:
            value, position = _JSON.raw_decode(text, _skip(text, start + len(_HERMES_OPEN), " \t\r\n"))
        except json.JSONDecodeError:
            return text, []
        position = _skip(text, position, " \t\r\n")
        if text.startswith(_HERMES_CLOSE, position):
            position += len(_HERMES_CLOSE)
        elif position < len(text):  # neither closed nor the end of the reply
            return text, []
        for item in value if isinstance(value, list) else [value]:
            call = _json_call(item)
            if call is None:
                return text, []
            calls.append(call)
    if not calls:
        return text, []
    return ("".join(content) + text[position:]).strip(), calls


def _json_call(value) -> Optional[Call]:
    """A call from {"name": str, "parameters" or "arguments": an object (or one as a JSON string)}."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if value.get("type", "function") != "function":
        return None
    arguments = value.get("parameters", value.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


# --- Tool calls out, as the reply streams --------------------------------------------------------

# How a Llama 3 reply that is calls can begin (after white space and ';'): JSON, a pythonic list
# (which Python's parser also reads inside parentheses or after a comment), <function=, the tag, a built-in.
_LLAMA3_OPENERS = ("{", "[", "(", "#", "\\", "<function=", PYTHON_TAG, "brave_search.call(", "wolfram_alpha.call(")


class ToolCallStream:
    """A reply's text as it streams in, split into content that is final and the calls, read at its end.

    Text that may belong to a call is held back: for Llama 3 (whose replies are calls or
    content, whole) a reply that opens like a call is held to its end; for Hermes the text
    from the first <tool_call> on, and white space or a partial "<tool_call>" at the end of
    the content. At the end `finish` parses the whole reply as `parse_reply` does. The
    pieces `push` returns and the content `finish` returns join to parse_reply's content.

    Args:
        tools, tool_format: as `parse_reply`'s.
    """

    def __init__(self, tools: List[dict], tool_format: str):
        self.tools, self.tool_format = tools, tool_format
        self.text = ""
        self.sent = ""  # the content returned so far

    def push(self, piece: str) -> str:
        """Takes the next piece of the reply; returns the content that became final ("" if none)."""
        self.text += piece
        final = self._final_content()
        assert final.startswith(self.sent), "the final content changed"
        new, self.sent = final[len(self.sent):], final
        return new

    def finish(self) -> Tuple[str, List[ToolCall]]:
        """(the content not yet returned, the reply's tool calls) once the reply is whole."""
        message = parse_reply(self.text, self.tools, self.tool_format)
        assert message["content"].startswith(self.sent), "content was returned that the whole reply does not hold"
        return message["content"][len(self.sent):], message["tool_calls"]

    def _final_content(self) -> str:
        """The longest beginning of the content that no continuation of the text can change."""
        text = self.text
        if not self.tools:
            return text
        if self.tool_format != "hermes":
            body = re.sub(r"^[\s;]+", "", text)
            if body == "" or any(body.startswith(o) or o.startswith(body) for o in _LLAMA3_OPENERS):
                return ""
            return text
        if text[:1].isspace():  # parse_reply strips the content only when the reply holds calls
            return ""
        start = text.find(_HERMES_OPEN)
        if start < 0:  # hold back what may begin a call
            start = next((i for i in range(max(0, len(text) - len(_HERMES_OPEN)), len(text))
                          if _HERMES_OPEN.startswith(text[i:])), len(text))
        return text[:start].rstrip()

"""The structured-output and tool-calling checks at full size, on the bundled SmolLM2-135M-Instruct
(CI runs a few of each: tests/test_structured.py, tests/test_tools.py, tests/test_serve.py):

    PYTHONPATH=. python tests/scripts/structured_outputs.py [--schema-requests 100] [--tool-requests 50]

1. --schema-requests seeded requests (seeds 0, 1, ...) with a JSON schema (a nested object, an
   enum, an array, required fields) at temperature 1 through the server (in this process, on
   loopback, called by the openai client, 8 at a time), then the same through the library
   (chat_completion, 4 dialogs a call, seeds 0, 1, ...): each reply must parse as JSON and
   validate against the schema (jsonschema).
2. --tool-requests requests with tools=[get_weather, get_time] and tool_choice "required"
   through the server, sampled at --tool-temperature (default 1, the server's default) with no
   max_tokens (the server's default, the rest of the context; --tool-max-tokens to set one): each
   must return a well-formed call to one of them (finish_reason "tool_calls", an id, the name
   of a given function) with arguments valid against its parameters.
3. --stream-requests of those requests streamed: the calls reassembled from the deltas must
   equal the non-streamed response's (the same seed).

Prints each count and exits 1 if any check failed.
"""

import argparse
import concurrent.futures
import json
import sys
import time

import jsonschema
import openai

from llama import Llama
from llama.default_model import ensure_default_model
from llama.serve import create_app
from tests.test_serve import running_server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
PERSON_DIALOG = [{"role": "user", "content": "Invent a person and describe them in JSON: name, age, role "
                                             "(admin, user or guest), tags and address (city and zip code)."}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "The city's name"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a time zone",
                                      "parameters": {"type": "object", "properties": {
                                          "zone": {"type": "string", "description": "An IANA time zone"}},
                                          "required": ["zone"]}}},
]
TOOL_DIALOG = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
LIBRARY_BATCH = 4


def valid_document(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), PERSON)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def valid_call(choice) -> bool:
    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or not calls:
        return False
    for call in calls:
        if not call.id or call.type != "function" or call.function.name not in PARAMETERS:
            return False
        try:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
        except (ValueError, jsonschema.ValidationError):
            return False
    return True


def streamed_calls(client, seed: int, max_tokens: int, temperature: float):
    calls = {}
    for chunk in client.chat.completions.create(model="smollm2", messages=TOOL_DIALOG, temperature=temperature,
                                                seed=seed, tools=TOOLS, tool_choice="required", max_tokens=max_tokens,
                                                stream=True):
        for piece in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(piece.index, ["", ""])
            call[0] += piece.function.name or ""
            call[1] += piece.function.arguments or ""
    return [(name, json.loads(arguments)) for name, arguments in calls.values()]


def report(name: str, passed: int, total: int, seconds: float) -> bool:
    if total == 0:
        return True
    print(f"{name}: {passed}/{total} ({passed / total:.0%}) in {seconds:.0f} s", flush=True)
    return passed == total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schema-requests", type=int, default=100)
    parser.add_argument("--tool-requests", type=int, default=50)
    parser.add_argument("--stream-requests", type=int, default=10)
    parser.add_argument("--tool-temperature", type=float, default=1.0, help="of the tool requests (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=400, help="of the schema requests (default: 400)")
    parser.add_argument("--tool-max-tokens", type=int, default=None,
                        help="of the tool requests (default: none sent, the server's: the rest of the context)")
    args = parser.parse_args()
    ckpt_dir, tokenizer_path = ensure_default_model()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=1024, max_batch_size=8)
    ok = True
    app = create_app(llama, model_name="smollm2", queue_size=args.schema_requests + args.tool_requests,
                     request_timeout=3600)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

        def person(seed):
            return client.chat.completions.create(model="smollm2", messages=PERSON_DIALOG, temperature=1.0,
                                                  seed=seed, max_tokens=args.max_tokens,
                                                  response_format=response_format).choices[0]

        def tool_call(seed):
            return client.chat.completions.create(model="smollm2", messages=TOOL_DIALOG, seed=seed,
                                                  temperature=args.tool_temperature,
                                                  max_tokens=args.tool_max_tokens, tools=TOOLS,
                                                  tool_choice="required").choices[0]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            choices = list(pool.map(person, range(args.schema_requests)))
            ok &= report("server, JSON schema, temperature 1: parse and validate",
                         sum(valid_document(c.message.content) for c in choices), len(choices),
                         time.perf_counter() - start)
            for seed, choice in enumerate(choices):
                if not valid_document(choice.message.content):
                    print(f"  seed {seed}: finish_reason {choice.finish_reason}, {choice.message.content!r:.300}")
            start = time.perf_counter()
            calls = list(pool.map(tool_call, range(args.tool_requests)))
            ok &= report(f'server, tool_choice "required", temperature {args.tool_temperature:g}: a well-formed call '
                         f'with valid arguments',
                         sum(map(valid_call, calls)), len(calls), time.perf_counter() - start)
            for seed, choice in enumerate(calls):
                if not valid_call(choice):
                    print(f"  seed {seed}: finish_reason {choice.finish_reason}, {choice.message.content!r:.300}")
            names = sorted({c.function.name for choice in calls for c in choice.message.tool_calls or []})
            print(f"  functions called: {', '.join(names)}; calls per reply: "
                  f"{sorted({len(choice.message.tool_calls or []) for choice in calls})}")
        start = time.perf_counter()
        same = 0
        for seed, whole in enumerate(calls[: args.stream_requests]):
            expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
            same += streamed_calls(client, seed, args.tool_max_tokens, args.tool_temperature) == expected
        ok &= report("server, streamed tool calls reassemble to the non-streamed calls", same,
                     min(args.stream_requests, len(calls)), time.perf_counter() - start)

    start = time.perf_counter()
    valid = 0
    for seed, first in enumerate(range(0, args.schema_requests, LIBRARY_BATCH)):  # 4 replies sampled per call
        rows = min(LIBRARY_BATCH, args.schema_requests - first)
        results = llama.chat_completion([PERSON_DIALOG] * rows, temperature=1.0, top_p=1.0,
                                        max_gen_len=args.max_tokens, seed=seed, json_schema=PERSON)
        valid += sum(valid_document(result["generation"]["content"]) for result in results)
    ok &= report("library, JSON schema, temperature 1: parse and validate", valid, args.schema_requests,
                 time.perf_counter() - start)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

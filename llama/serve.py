"""An OpenAI-compatible HTTP server with continuous batching: `python -m llama.serve`.

    python -m llama.serve                                    # the bundled SmolLM2-135M-Instruct, 127.0.0.1:8000
    python -m llama.serve --ckpt-dir Meta-Llama-3-8B-Instruct/ --max-batch-size 16 --port 8080
    torchrun --nproc_per_node 2 -m llama.serve --ckpt-dir llama-2-13b-chat/ --tokenizer tokenizer.model

Endpoints:
    POST /v1/completions        text completion ("stream": true: server-sent events, then `data: [DONE]`)
    POST /v1/chat/completions   the assistant's next message, likewise
    GET  /v1/models             the one model served
    GET  /health                slots in use, queue length, counters
    GET  /metrics               Prometheus metrics: requests, latencies, queue, KV-cache use (`llama.metrics`)

Requests take OpenAI's fields (model, prompt / messages, max_tokens, temperature, top_p,
stop, seed, logprobs, stream, stream_options, presence_penalty, frequency_penalty, logit_bias, n,
response_format; for chats tools, tool_choice, parallel_tool_calls) and the library's other
controls under vLLM's names: top_k, min_p, min_tokens (`min_gen_len`), repetition_penalty,
bad_words. response_format {"type": "json_object"} or {"type": "json_schema", "json_schema":
{"schema": ...}} constrains the text (`llama.grammar`, needs llguidance); tool_choice "required"
or a named function forces a valid call the same way (`llama.tools.forced_call_grammar`).
Defaults are OpenAI's (temperature 1, top_p 1). Every error is OpenAI's JSON,
`{"error": {"message", "type", "param", "code"}}`, and never stops the server: 400 for
invalid requests, 404 for an unknown model, 413 for an oversized body, 429 (with
Retry-After) when the queue is full, 504 when a request runs past --request-timeout.

The HTTP side (this module) turns requests into `llama.scheduler.Job`s and the
scheduler's events into OpenAI's responses; `llama.scheduler` feeds them to the
library's decoding engine (`Llama.engine`), which batches them on the model.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Union
from typing import Sequence as SequenceType

import fairscale.nn.model_parallel.initialize as fs_init

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as e:  # an optional feature: say how to get it
    raise ImportError(f"llama.serve needs FastAPI, uvicorn and prometheus_client ({e}): pip install 'llama[serve]'") from e

from llama.default_model import DEFAULT_MODEL_NAME
from llama.distributed import get_rank
from llama.generation import Llama
from llama.options import add_model_options, build_llama, check_model_options
from llama.errors import InvalidArgument
from llama.metrics import ServerMetrics
from llama.scheduler import Delta, Finished, Job, QueueFull, Scheduler, TokenLogprob
from llama.tools import ToolCallStream, finish_reason, parse_reply

logger = logging.getLogger("llama.serve")  # the same name under `python -m`

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_PREFIX_CACHE_CONTEXTS = 4  # the prefix cache holds this many full contexts' keys and values by default
ROLE_ALIASES = {"developer": "system"}  # OpenAI's names for the library's roles


# --- Errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(error: ValidationError) -> APIError:
    """A 400 naming the first field pydantic refused."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {loc}", param=param)
    return APIError(400, f"invalid {loc}: {first['msg']}", param=param)


# --- Request bodies ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields of both endpoints; None is the default. Unknown fields are refused (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None  # None: the model served
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None  # 1 (OpenAI's default); 0 is greedy
    top_p: Optional[float] = None  # 1
    top_k: Optional[int] = None  # 0: off
    min_p: Optional[float] = None  # 0: off
    min_tokens: Optional[int] = Field(None, ge=0)  # stop tokens are not generated before this many tokens
    repetition_penalty: Optional[float] = None  # 1: off
    presence_penalty: Optional[float] = None  # 0: off
    frequency_penalty: Optional[float] = None  # 0: off
    bad_words: Union[str, List[str], None] = None  # one string: one word
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None  # choices: 1 to --max-batch-size
    logit_bias: Optional[Dict[str, float]] = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]
    response_format: Optional[Dict[str, Any]] = None  # {"type": "text" | "json_object" | "json_schema", ...}
    speculative: Optional[bool] = None  # False: this request decodes without the server's --speculative
    user: Optional[str] = None  # accepted, unused


class CompletionRequest(GenerationRequest):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # this many alternatives per token
    echo: Optional[bool] = False
    suffix: Optional[str] = None  # unsupported
    best_of: Optional[int] = None  # only 1


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...: not used by the chat formats
    role: str
    content: Union[str, List[ContentPart], None] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None  # assistant: its calls (checked by the chat format)
    tool_call_id: Optional[str] = None  # tool: the call it answers


class ChatRequest(GenerationRequest):
    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    tools: Optional[List[Dict[str, Any]]] = None  # checked by `llama.tools.normalize_tools`
    tool_choice: Union[str, Dict[str, Any], None] = None  # "auto" (default with tools), "none", "required", a function
    parallel_tool_calls: Optional[bool] = None  # True; False: at most one call per choice


async def read_json_body(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past `limit` bytes (read no further), 400 if it is not JSON."""
    too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


# --- Response bodies --------------------------------------------------------------------------------


class TextCompletionFormat:
    """OpenAI's /v1/completions bodies for one request (echo: the prompt's text comes first)."""

    object = "text_completion"

    def __init__(self, model: str, echo: str = "", top_logprobs: Optional[int] = None, n: int = 1):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.echo, self.top_logprobs, self.n = echo, top_logprobs, n
        self.offsets = [len(echo)] * n  # per choice: characters before its next token, for text_offset

    def _body(self, choices: List[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening_chunks(self) -> List[dict]:
        return [self.chunk(i, self.echo, [], None) for i in range(self.n)] if self.echo else []

    def delta_chunks(self, delta: Delta) -> List[dict]:
        """The chunks that stream one `Delta`: its text and logprobs, then its finish reason."""
        chunks = []
        if delta.text or delta.logprobs:
            chunks.append(self.chunk(delta.index, delta.text, delta.logprobs, None))
        if delta.finish_reason is not None:
            chunks.append(self.chunk(delta.index, "", [], delta.finish_reason))
        return chunks

    def chunk(self, index: int, text: str, logprobs: List[TokenLogprob], finish_reason: Optional[str]) -> dict:
        choice = {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs),
                  "finish_reason": finish_reason}
        return self._body([choice])

    def response(self, choices: List["Choice"], finished: Finished) -> dict:
        return self._body([{"index": i, "text": self.echo + c.text, "logprobs": self._logprobs(i, c.logprobs),
                            "finish_reason": c.finish_reason} for i, c in enumerate(choices)], usage=usage(finished))

    def usage_chunk(self, finished: Finished) -> dict:
        return self._body([], usage=usage(finished))

    def _logprobs(self, index: int, entries: List[TokenLogprob]) -> Optional[dict]:
        if self.top_logprobs is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(entry.text)
        return {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries] if self.top_logprobs > 0 else None,
            "text_offset": offsets,
        }


class ChatCompletionFormat:
    """OpenAI's /v1/chat/completions bodies for one request.

    With tools (those shown to the model, in `tool_format`), each choice's reply is read for
    calls (`llama.tools.parse_reply`): the message holds "tool_calls" and finish_reason is
    "tool_calls" for a reply that calls and ended by itself. Streamed, text that may be a call
    is held back (`llama.tools.ToolCallStream`) and the calls come at the choice's end, each as
    two deltas in OpenAI's shape: its id, type and name (arguments ""), then its arguments.
    """

    object = "chat.completion"

    def __init__(self, model: str, logprobs: bool = False, n: int = 1, tools: SequenceType[dict] = (),
                 tool_format: str = "hermes", parallel_tool_calls: bool = True):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.logprobs, self.n = logprobs, n
        self.tools, self.tool_format, self.parallel_tool_calls = list(tools), tool_format, parallel_tool_calls
        self.streams = [ToolCallStream(self.tools, tool_format) for _ in range(n)]  # per choice, when streaming

    def _body(self, object: str, choices: List[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening_chunks(self) -> List[dict]:
        return [self._body("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}])
                for i in range(self.n)]

    def delta_chunks(self, delta: Delta) -> List[dict]:
        """The chunks that stream one `Delta`: the content that became final (with the logprobs),
        and at the choice's end the rest of its content, its tool calls and its finish reason."""
        stream = self.streams[delta.index]
        chunks = []
        content = stream.push(delta.text)
        if content or delta.logprobs:
            chunks.append(self._chunk(delta.index, {"content": content}, delta.logprobs))
        if delta.finish_reason is None:
            return chunks
        content, calls = stream.finish()
        if content:
            chunks.append(self._chunk(delta.index, {"content": content}))
        reply = {"role": "assistant", "content": stream.sent, "tool_calls": self._calls(calls)}
        for i, call in enumerate(reply["tool_calls"]):
            header = {"index": i, "id": call["id"], "type": "function",
                      "function": {"name": call["function"]["name"], "arguments": ""}}
            chunks.append(self._chunk(delta.index, {"tool_calls": [header]}))
            arguments = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            chunks.append(self._chunk(delta.index, {"tool_calls": [arguments]}))
        chunks.append(self._chunk(delta.index, {}, finish_reason=finish_reason(reply, delta.finish_reason)))
        return chunks

    def _chunk(self, index: int, delta: dict, logprobs: SequenceType[TokenLogprob] = (),
               finish_reason: Optional[str] = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(list(logprobs)),
                  "finish_reason": finish_reason}
        return self._body("chat.completion.chunk", [choice])

    def response(self, choices: List["Choice"], finished: Finished) -> dict:
        return self._body("chat.completion", [self._choice(i, c) for i, c in enumerate(choices)],
                          usage=usage(finished))

    def _choice(self, index: int, choice: "Choice") -> dict:
        reply = parse_reply(choice.text, self.tools, self.tool_format)
        reply["tool_calls"] = self._calls(reply["tool_calls"])
        message = {"role": "assistant", "content": reply["content"] or (None if reply["tool_calls"] else "")}
        if reply["tool_calls"]:
            message["tool_calls"] = reply["tool_calls"]
        return {"index": index, "message": message, "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": finish_reason(reply, choice.finish_reason)}

    def _calls(self, calls: List[dict]) -> List[dict]:
        return calls if self.parallel_tool_calls else calls[:1]

    def usage_chunk(self, finished: Finished) -> dict:
        return self._body("chat.completion.chunk", [], usage=usage(finished))

    def _logprobs(self, entries: List[TokenLogprob]) -> Optional[dict]:
        if not self.logprobs:
            return None

        def item(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**item(e.text, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}


@dataclass
class Choice:
    """One choice of a whole (not streamed) response, gathered from its deltas."""

    text: str = ""
    logprobs: List[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def sse(data: Union[dict, str]) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# --- The server -------------------------------------------------------------------------------------


class OpenAIServer:
    """Turns OpenAI requests into scheduler sequences, and their events into OpenAI responses.

    Args:
        llama: the model and tokenizer.
        scheduler: batches the sequences (started and stopped by the app's lifespan).
        model_name: what clients pass as `model`.
        request_timeout: seconds a request may wait and run in all.
        max_body_bytes: largest request body accepted.
    """

    def __init__(self, llama: Llama, scheduler: Scheduler, *, model_name: str,
                 request_timeout: Optional[float] = 600.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.llama, self.tokenizer, self.scheduler = llama, llama.tokenizer, scheduler
        self.model_name = model_name
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.max_seq_len = llama.model.params.max_seq_len
        self.created = int(time.time())

    # --- Endpoints ---

    async def completions(self, request: Request):
        body = await self._read(request, CompletionRequest)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise APIError(400, f"best_of must be 1 (got {body.best_of}): send separate requests", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's logprobs) is not supported", param="echo")
        prompt_tokens = self._completion_prompt(body.prompt)
        top = body.logprobs
        job = self._job(body, prompt_tokens, body.max_tokens, default_max_tokens=16,
                             logprobs=top is not None, top_logprobs=top or 0)
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else self.tokenizer.decode(prompt_tokens)
        fmt = TextCompletionFormat(self.model_name, echo, top, job.n)
        return await self._respond(request, job, self._submit(job), fmt, body)

    async def chat_completions(self, request: Request):
        body = await self._read(request, ChatRequest)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tool_format, tools, forced = self._tool_setup(body)
        prompt_tokens, refusal = self._chat_prompt(body, tool_format)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = self._job(body, prompt_tokens, max_tokens, default_max_tokens=None,
                             logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0, grammar=forced)
        if refusal is None:
            events = self._submit(job)
        else:  # the chat format refuses this dialog: its refusal is the whole answer, as in chat_completion
            refusals = [Delta(refusal, [], i, "stop") for i in range(job.n)]
            events = replay([*refusals, Finished("stop", len(prompt_tokens), 0)])
        parallel_tool_calls = body.parallel_tool_calls is not False
        fmt = ChatCompletionFormat(self.model_name, body.logprobs, job.n, tools, tool_format, parallel_tool_calls)
        return await self._respond(request, job, events, fmt, body)

    async def models(self):
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama",
                 "max_model_len": self.max_seq_len}
        return {"object": "list", "data": [model]}

    async def health(self):
        return {"status": "ok", "model": self.model_name, **self.scheduler.health()}

    # --- Requests -> sequences ---

    async def _read(self, request: Request, schema: type) -> GenerationRequest:
        data = await read_json_body(request, self.max_body_bytes)
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")
        max_batch_size = self.scheduler.max_batch_size
        if body.n is not None and not 1 <= body.n <= max_batch_size:
            raise APIError(400, f"n must be in [1, {max_batch_size}] (each choice is a row of the batch; the server "
                                f"was started with --max-batch-size {max_batch_size}), got {body.n}", param="n")
        return body

    def _completion_prompt(self, prompt) -> List[int]:
        """Token ids of a prompt given as text or as ids (one prompt; a list of one is accepted)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            raise APIError(400, f"one prompt per request, got {len(prompt)}: send them as separate requests "
                                f"(they are batched together)", param="prompt")
        if isinstance(prompt, str):
            tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        else:
            tokens = list(prompt)
            vocab_size = self.llama.model.params.vocab_size
            if any(not 0 <= t < vocab_size for t in tokens):
                raise APIError(400, f"prompt holds token ids outside the vocabulary [0, {vocab_size})", param="prompt")
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        return tokens

    def _tool_setup(self, body: ChatRequest):
        """(the tool format or None, the tools shown to the model, the grammar of a forced call or None)."""
        if body.tools is None:
            if body.tool_choice not in (None, "none", "auto"):
                raise APIError(400, f"tool_choice {body.tool_choice!r} needs tools", param="tool_choice")
            return None, [], None
        tool_choice = "auto" if body.tool_choice is None else body.tool_choice
        try:
            return self.llama.tool_setup(body.tools, tool_choice,
                                         parallel_tool_calls=body.parallel_tool_calls is not False)
        except ValueError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param) from None

    def _chat_prompt(self, body: ChatRequest, tool_format: Optional[str]):
        """(token ids of the dialog with its tools, the chat format's refusal or None)."""
        dialog = []
        for i, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                others = [part.type for part in content if part.type != "text"]
                if others:
                    raise APIError(400, f"messages[{i}]: only text content is supported, got {others[0]!r}",
                                   param="messages")
                content = "".join(part.text or "" for part in content)
            turn = {"role": ROLE_ALIASES.get(message.role, message.role), "content": content or ""}
            if message.tool_calls:
                turn["tool_calls"] = message.tool_calls
                turn["content"] = content  # may be None beside calls
            if message.tool_call_id is not None:
                turn["tool_call_id"] = message.tool_call_id
            dialog.append(turn)
        try:
            if tool_format is None:
                tokens = self.llama.formatter.encode_dialog_prompt(dialog)
            else:
                tool_choice = "auto" if body.tool_choice is None else body.tool_choice
                tokens = self.llama.formatter.encode_dialog_prompt(dialog, body.tools, tool_choice, tool_format)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        refuse = getattr(self.llama.formatter, "refusal", None)  # only formats with forgeable tags have one
        return tokens, (refuse(dialog) if refuse else None)

    def _job(self, body: GenerationRequest, prompt_tokens: List[int], max_tokens: Optional[int], *,
                  default_max_tokens: Optional[int], logprobs: bool, top_logprobs: int, grammar=None) -> Job:
        """A scheduler job for the request; 400 when it cannot fit the context or a control is out of range."""
        room = self.max_seq_len - len(prompt_tokens)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.max_seq_len} tokens and the prompt "
                                f"has {len(prompt_tokens)}: shorten it (or start the server with a larger "
                                f"--max-seq-len)", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.max_seq_len} tokens; the prompt has "
                                f"{len(prompt_tokens)} and max_tokens asks for {max_tokens} more: ask for at most "
                                f"{room}", param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(prompt_tokens, max_tokens, self._sampling_params(body, grammar), stop=stop, seed=body.seed,
                   logprobs=logprobs, top_logprobs=top_logprobs, timeout=self.request_timeout, n=body.n or 1,
                   speculative=body.speculative is not False)

    def _sampling_params(self, body: GenerationRequest, grammar=None):
        """The library's validated controls; their own errors become the 400's, naming the field.
        grammar: a forced tool call's (`Llama.tool_setup`), which excludes a response_format."""

        def given(value, default):
            return default if value is None else value

        json_schema = json_schema_of(body.response_format)
        if json_schema is not None and grammar is not None:
            raise APIError(400, "tool_choice forces a tool call: response_format cannot also constrain the reply",
                           param="response_format")
        try:
            return self.llama.sampling_params(
                given(body.temperature, 1.0), given(body.top_p, 1.0), top_k=given(body.top_k, 0),
                min_p=given(body.min_p, 0.0), min_gen_len=given(body.min_tokens, 0),
                repetition_penalty=given(body.repetition_penalty, 1.0),
                presence_penalty=given(body.presence_penalty, 0.0),
                frequency_penalty=given(body.frequency_penalty, 0.0), bad_words=body.bad_words,
                logit_bias=token_ids_of(body.logit_bias), json_schema=json_schema, grammar=grammar,
            )
        except InvalidArgument as e:
            param = {"min_gen_len": "min_tokens", "json_schema": "response_format"}.get(e.name, e.name)
            raise APIError(400, str(e), param=param if param in GenerationRequest.model_fields else None) from None

    # --- Jobs -> responses ---

    def _submit(self, job: Job) -> AsyncIterator[object]:
        """Queues the sequence (429 when the queue is full); returns its events, as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}): retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return events_of(queue, job)

    async def _respond(self, request: Request, job: Job, events: AsyncIterator[object], fmt, body):
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._stream(events, fmt, include_usage), media_type="text/event-stream",
                                     headers=headers)
        return JSONResponse(await self._collect(request, job, events, fmt))

    async def _collect(self, request: Request, job: Job, events: AsyncIterator[object], fmt) -> dict:
        """The whole response; a client that disconnects meanwhile cancels the sequence."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        choices = [Choice() for _ in range(job.n)]
        try:
            async for event in events:
                if isinstance(event, Delta):
                    choice = choices[event.index]
                    choice.text += event.text
                    choice.logprobs.extend(event.logprobs)
                    choice.finish_reason = event.finish_reason or choice.finish_reason
                else:
                    finished = event
        finally:
            watcher.cancel()
        self._raise_failure(finished)
        return fmt.response(choices, finished)

    async def _stream(self, events: AsyncIterator[object], fmt, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: OpenAI's chunks, then `data: [DONE]`. Starlette cancels it when the client leaves."""
        for chunk in fmt.opening_chunks():
            yield sse(chunk)
        async for event in events:
            if isinstance(event, Delta):
                for chunk in fmt.delta_chunks(event):
                    yield sse(chunk)
                continue
            try:
                self._raise_failure(event)
            except APIError as e:  # the status line is sent already: the error is an event
                yield sse(e.body())
                break
            if include_usage:
                yield sse(fmt.usage_chunk(event))
        yield sse("[DONE]")

    def _raise_failure(self, finished: Finished) -> None:
        if finished.reason == "timeout":
            raise APIError(504, f"the request ran past the server's --request-timeout of {self.request_timeout:g} s",
                           type="timeout_error", code="request_timeout")
        if finished.reason == "error":
            raise APIError(500, finished.message, type="server_error")


def json_schema_of(response_format: Optional[dict]) -> Optional[dict]:
    """The JSON schema OpenAI's response_format asks for: its {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}'s schema, any object for {"type": "json_object"}, None for
    {"type": "text"} or none; 400 for others."""
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return spec["schema"]
    raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got "
                        f"{response_format.get('type')!r}", param="response_format")


def token_ids_of(logit_bias: Optional[Dict[str, float]]) -> Dict[int, float]:
    """OpenAI's logit_bias, whose keys are token ids written as strings, with int keys; 400 for other keys."""
    try:
        return {int(token): bias for token, bias in (logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, f"logit_bias keys must be token ids, got {list(logit_bias)}", param="logit_bias") from None


async def events_of(queue: asyncio.Queue, job: Job) -> AsyncIterator[object]:
    """A sequence's events up to its `Finished`; leaving early (a client gone) cancels the sequence."""
    try:
        while True:
            event = await queue.get()
            yield event
            if isinstance(event, Finished):
                return
    finally:
        job.cancel()  # no-op once finished


async def replay(events: List[object]) -> AsyncIterator[object]:
    for event in events:
        yield event


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancels the sequence when the client closes the connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    logger.debug("client left: cancelling request %d", job.id)
    job.cancel()


def create_app(llama: Llama, *, model_name: str, queue_size: int = 64, request_timeout: Optional[float] = 600.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, prefix_cache_tokens: Optional[int] = None) -> FastAPI:
    """The FastAPI app serving `llama`; its scheduler thread runs `llama.engine` while the app does
    (`app.state.scheduler`). Under torchrun, create it on rank 0 only: its engine leads the other
    ranks, which run `llama.engine.runner.follow()`.

    prefix_cache_tokens: the prefix cache's budget (`Engine.enable_prefix_cache`); default
    DEFAULT_PREFIX_CACHE_CONTEXTS x max_seq_len tokens; 0 turns it off."""
    if prefix_cache_tokens is None:
        prefix_cache_tokens = DEFAULT_PREFIX_CACHE_CONTEXTS * llama.model.params.max_seq_len
    llama.engine.enable_prefix_cache(prefix_cache_tokens)
    llama.engine.runner.lead()
    metrics = ServerMetrics(lambda: scheduler.snapshot())
    scheduler = Scheduler(llama.engine, queue_size=queue_size, metrics=metrics)
    server = OpenAIServer(llama, scheduler, model_name=model_name, request_timeout=request_timeout or None,
                          max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        logger.info("serving %s: max_batch_size=%d, max_seq_len=%d, queue_size=%d", model_name,
                    scheduler.max_batch_size, scheduler.max_seq_len, queue_size)
        yield
        scheduler.stop()

    app = FastAPI(title="llama", lifespan=lifespan)
    app.state.scheduler, app.state.server = scheduler, server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route, wrong method
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", lambda: Response(metrics.render(), media_type=CONTENT_TYPE_LATEST), methods=["GET"])
    return app


# --- Command line -----------------------------------------------------------------------------------


def parse_args(argv: Optional[SequenceType[str]] = None, prog: str = "python -m llama.serve") -> argparse.Namespace:
    """The server's options: the model options every command shares, then --model-name and the HTTP side's."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    model = add_model_options(parser, max_batch_size=8)
    model.add_argument("--model-name", help="the `model` clients ask for (default: the checkpoint directory's name)")
    http = parser.add_argument_group("serving")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="default: 8000")
    http.add_argument("--queue-size", type=int, default=64,
                      help="most requests waiting for a free slot; more get 429 (default: 64)")
    http.add_argument("--request-timeout", type=float, default=600.0,
                      help="seconds a request may wait and run, 0 for no limit (default: 600)")
    http.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                      help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    http.add_argument("--prefix-cache-tokens", type=int,
                      help=f"keys and values of earlier prompts kept for reuse, in tokens; 0 turns prefix caching "
                           f"off (default: {DEFAULT_PREFIX_CACHE_CONTEXTS} x --max-seq-len)")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    return args


def main(argv: Optional[SequenceType[str]] = None, prog: str = "python -m llama.serve") -> None:
    """`python -m llama.serve` (and `llama serve`): loads the model and serves it until interrupted.

    Args:
        argv: the command-line options (default: sys.argv[1:]).
        prog: the command's name in --help and errors (`llama serve` for the console script).

    Under torchrun every rank loads its shard; rank 0 serves HTTP and schedules,
    the other ranks follow its steps.
    """
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llama = build_llama(args)  # and torch's threads, as --threads says
    model_name = args.model_name or (args.ckpt_dir.resolve().name if args.ckpt_dir else DEFAULT_MODEL_NAME)
    runner = llama.engine.runner
    if runner.world_size != fs_init.get_model_parallel_world_size():
        raise ValueError(
            f"{runner.world_size} processes serve a {fs_init.get_model_parallel_world_size()}-shard checkpoint: "
            f"launch one process per shard (data-parallel replicas are not supported)"
        )
    if get_rank() != 0:
        # Ctrl-C and torchrun's signals reach every rank: the followers leave when rank 0,
        # shutting down gracefully, tells them to (`ModelRunner.close`).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        runner.follow()
        return
    app = create_app(llama, model_name=model_name, queue_size=args.queue_size, request_timeout=args.request_timeout,
                     prefix_cache_tokens=args.prefix_cache_tokens,
                     max_body_bytes=args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

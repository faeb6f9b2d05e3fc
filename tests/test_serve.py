"""The OpenAI-compatible server (`llama.serve`) on a tiny checkpoint, over loopback.

The server runs in this process (uvicorn in a thread, on a free port) and is
called with the official `openai` client and with raw httpx requests. Its
answers are compared with the library's `text_completion` / `chat_completion`
for the same request alone: the tiny model's text is gibberish, but it must be
the same gibberish, token for token, however the requests were batched.
"""

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the tests call the server with the openai client")
httpx = pytest.importorskip("httpx", reason="the tests call the server with httpx")

import uvicorn  # noqa: E402

from bench.serve_load import free_port  # noqa: E402
from llama import Llama  # noqa: E402
from llama.serve import create_app  # noqa: E402

MAX_SEQ_LEN = 96
MODEL = "tiny"
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Hello",
    "The quick brown fox jumps over the lazy dog because",
    "In 1969, the first",
    "Water boils at",
    "The meaning of life",
    "import torch\nimport numpy as np\n",
    "Dear Sir or Madam,",
    "Q: What is 2 + 2?\nA:",
    "Roses are red,",
    "She opened the door and saw",
    "The best way to learn",
    "Llamas are",
]


@contextlib.contextmanager
def running_server(app):
    """Serves `app` on a free loopback port in a background thread; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build(tiny_checkpoints, tokenizer_path, max_batch_size):
    return Llama.build(tiny_checkpoints["gqa"], tokenizer_path, max_seq_len=MAX_SEQ_LEN,
                       max_batch_size=max_batch_size, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, llama3_tokenizer_path):
    """The library on its own: what each request must equal."""
    return build(tiny_checkpoints, llama3_tokenizer_path, max_batch_size=1)


@pytest.fixture(scope="module")
def server(tiny_checkpoints, llama3_tokenizer_path):
    """A server with 8 slots and room for 16 waiting requests; yields its FastAPI app with `.url`."""
    llama = build(tiny_checkpoints, llama3_tokenizer_path, max_batch_size=8)
    app = create_app(llama, model_name=MODEL, queue_size=16, request_timeout=60, max_body_bytes=4096)
    with running_server(app) as url:
        app.url = url
        yield app


@pytest.fixture(scope="module")
def small_server(tiny_checkpoints, llama3_tokenizer_path):
    """One slot and one place in the queue: easy to fill."""
    llama = build(tiny_checkpoints, llama3_tokenizer_path, max_batch_size=1)
    app = create_app(llama, model_name=MODEL, queue_size=1, request_timeout=60)
    with running_server(app) as url:
        app.url = url
        yield app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(app) -> dict:
    return httpx.get(app.url + "/health").json()


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def slow_steps(monkeypatch, scheduler, seconds=0.0, gate=None):
    """Makes every model step of the scheduler wait (for `gate`, then `seconds`)."""
    run = scheduler.runner.run

    def slow_run(step):
        if gate is not None:
            gate.wait()
        time.sleep(seconds)
        return run(step)

    monkeypatch.setattr(scheduler.runner, "run", slow_run)


def greedy(reference, prompt, max_tokens, **options) -> str:
    return reference.text_completion([prompt], temperature=0, max_gen_len=max_tokens, **options)[0]["generation"]


# --- Answers equal the library's ------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status = health(server)
    assert status["status"] == "ok" and status["max_batch_size"] == 8 and status["running"] == 0


def test_completion_matches_library(client, reference):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert response.choices[0].text == greedy(reference, PROMPTS[0], 12)
    assert response.object == "text_completion"
    prompt_tokens = len(reference.tokenizer.encode(PROMPTS[0], bos=True, eos=False))
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_matches_library(client, reference):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"}]
    response = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=10, temperature=0)
    expected = reference.chat_completion([dialog], temperature=0, max_gen_len=10)[0]["generation"]
    assert response.choices[0].message.content == expected["content"]
    assert response.choices[0].message.role == "assistant"


def test_streaming_matches_library(client, reference):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == greedy(reference, PROMPTS[1], 12)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    dialog = [{"role": "user", "content": "Tell me a story."}]
    stream = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    expected = reference.chat_completion([dialog], temperature=0, max_gen_len=10)[0]["generation"]["content"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens <= 10 and not chunks[-1].choices


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def stream_concurrently(client, prompts, max_tokens):
    """Each prompt streamed greedily by its own thread, all at once; the texts, in prompt order."""
    results = [None] * len(prompts)

    def ask(i):
        stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens[i],
                                           temperature=0, stream=True)
        results[i] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_sixteen_concurrent_streams_each_get_their_text_alone(client, reference):
    """More clients than slots, different prompt lengths and answer lengths: admissions mid-decode."""
    max_tokens = [6 + 3 * (i % 5) for i in range(len(PROMPTS))]
    expected = [greedy(reference, p, n) for p, n in zip(PROMPTS, max_tokens)]
    assert stream_concurrently(client, PROMPTS, max_tokens) == expected


def test_seeded_sampling_matches_library(client, reference):
    options = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    expected = reference.text_completion([PROMPTS[3]], max_gen_len=12, **options)[0]["generation"]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, seed=1234, temperature=0.9,
                                         top_p=0.95, extra_body={"top_k": 50})
    assert response.choices[0].text == expected


def test_penalties_and_min_tokens_match_library(client, reference):
    options = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, min_gen_len=8)
    expected = greedy(reference, PROMPTS[4], 8, **options)
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 8})
    assert response.choices[0].text == expected
    assert response.usage.completion_tokens == 8


def test_logit_bias_matches_library(client, reference):
    bias = {"42": 100, "1820": -100}
    response = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0, logit_bias=bias)
    expected = greedy(reference, PROMPTS[3], 4, logit_bias={42: 100, 1820: -100})
    assert response.choices[0].text == expected == reference.tokenizer.decode([42] * 4)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="Hi", logit_bias={"the": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="Hi", logit_bias={"42": 300})


def test_n_choices_are_the_librarys_n_continuations(client, tiny_checkpoints, llama3_tokenizer_path):
    """n sampled choices, drawn together from the request's seeded generator, as `generate(n=...)` draws them."""
    reference = build(tiny_checkpoints, llama3_tokenizer_path, max_batch_size=3)
    options = dict(temperature=1.0, top_p=1.0, max_gen_len=6, seed=11, n=3)  # top_p 1: OpenAI's default
    expected = [c["generation"] for c in reference.text_completion([PROMPTS[4]], **options)]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=1.0, seed=11, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == expected and len(set(expected)) > 1
    tokens = sum(len(reference.tokenizer.encode(t, bos=False, eos=False)) for t in expected)
    assert response.usage.completion_tokens >= min(tokens, 3 * 6) // 2  # every choice counted

    stream = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=1.0, seed=11, n=3,
                                       stream=True)
    streamed, finished = ["", "", ""], [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert streamed == expected and all(reason in ("stop", "length") for reason in finished)

    greedy_three = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, n=3)
    assert [c.text for c in greedy_three.choices] == [greedy(reference, PROMPTS[4], 6)] * 3  # = 3 single requests

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[4]}],
                                          max_tokens=6, temperature=1.0, seed=11, n=2)
    dialog = [{"role": "user", "content": PROMPTS[4]}]
    expected = [c["generation"]["content"] for c in reference.chat_completion([dialog], **{**options, "n": 2})]
    assert [c.message.content for c in chat.choices] == expected


def scrape(app) -> dict:
    """/metrics as {(name, labels): value}, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(app.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_count_requests_tokens_and_latencies(server, client):
    before = scrape(server)
    response = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=7, temperature=0,
                                         extra_body={"min_tokens": 7})
    after = scrape(server)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("llama_requests_total", (("reason", "length"),)) == 1
    assert grew("llama_generation_tokens_total") == response.usage.completion_tokens == 7
    assert grew("llama_prompt_tokens_total") == response.usage.prompt_tokens
    assert grew("llama_time_to_first_token_seconds_count") == 1
    assert grew("llama_time_per_output_token_seconds_count") == 6  # between 7 tokens
    assert grew("llama_e2e_request_latency_seconds_count") == 1
    assert after[("llama_requests_running", ())] == 0 and after[("llama_requests_waiting", ())] == 0
    assert after[("llama_kv_cache_usage_ratio", ())] == 0.0  # nothing running holds positions


def test_metrics_gauges_see_a_running_request(small_server, monkeypatch):
    gate = threading.Event()
    slow_steps(monkeypatch, small_server.state.scheduler, gate=gate)
    body = {"model": MODEL, "prompt": PROMPTS[8], "max_tokens": 4, "temperature": 0}
    thread = threading.Thread(target=lambda: httpx.post(small_server.url + "/v1/completions", json=body, timeout=60))
    thread.start()
    try:
        wait_for(lambda: health(small_server)["running"] == 1)  # admitted, its prefill held at the gate
        metrics = scrape(small_server)
        assert metrics[("llama_requests_running", ())] == 1 and metrics[("llama_sequences_running", ())] == 1
        assert 0 < metrics[("llama_kv_cache_usage_ratio", ())] <= 1
    finally:
        gate.set()
        thread.join(timeout=60)


def test_prefix_caching_is_on_and_answers_stay_the_librarys(server, client, reference):
    """Requests sharing a long system prompt: later ones start from its cached blocks (the hit rate
    grows) and every answer equals the library's without a prefix cache."""
    system = "You are a careful assistant. " * 6
    prompts = [system + question for question in ("Name a colour.", "Name a fruit.", "Name a river.")]
    index = server.state.scheduler.engine.prefix
    hits = index.hits
    for prompt in prompts:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert response.choices[0].text == greedy(reference, prompt, 6)
    assert index.hits >= hits + 2 * index.block_size  # the 2nd and 3rd found at least a block each
    assert 0 < scrape(server)[("llama_prefix_cache_hit_rate", ())] == health(server)["prefix_cache_hit_rate"] <= 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_memory_stays_bounded_over_many_distinct_long_prompts(server):
    """200 requests with distinct long prompts (each fills prefix-cache blocks, evicting older ones):
    the process' resident memory after them is within 10 % of its level after the first 20."""
    def ask(i):
        prompt = " ".join(f"w{i}x{j}" for j in range(20))  # distinct from the first token on, ~60 tokens
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200

    for i in range(20):
        ask(i)
    settled = rss_bytes()
    for i in range(20, 200):
        ask(i)
    assert len(server.state.scheduler.engine.prefix.slots) <= server.state.scheduler.engine.prefix.n_slots
    assert rss_bytes() <= 1.10 * settled, (settled, rss_bytes())


def test_stop_string_cuts_like_the_library(client, reference):
    full = greedy(reference, PROMPTS[5], 16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == greedy(reference, PROMPTS[5], 16, stop=[stop])
    assert response.choices[0].finish_reason == "stop"


def test_logprobs_match_library(client, reference):
    expected = reference.text_completion([PROMPTS[6]], temperature=0, max_gen_len=6, logprobs=True)[0]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=6, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == expected["tokens"]
    assert logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)  # two alternatives (fewer if their texts collide)

    dialog = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 and item.logprob <= 0 for item in content)


# --- Slots, queue, timeout ---------------------------------------------------------------------------


def test_disconnected_client_frees_its_slot(server, monkeypatch):
    scheduler = server.state.scheduler
    slow_steps(monkeypatch, scheduler, seconds=0.02)  # 80 steps would take 1.6 s
    before = dict(scheduler.stats)
    body = {"model": MODEL, "prompt": PROMPTS[7], "max_tokens": 80, "min_tokens": 80, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # (dropping this iterator would close the connection)
        next(lines)  # the first chunk: it runs
        assert health(server)["running"] == 1
    wait_for(lambda: health(server)["running"] == 0, timeout=5)
    stats = health(server)
    assert stats.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert stats.get("finished_length", 0) == before.get("finished_length", 0)  # it did not run to the end
    assert stats["tokens"] - before.get("tokens", 0) < 80


def test_disconnected_client_frees_its_slot_without_streaming(server, monkeypatch):
    scheduler = server.state.scheduler
    slow_steps(monkeypatch, scheduler, seconds=0.02)
    before = scheduler.stats["finished_cancelled"]
    body = {"model": MODEL, "prompt": PROMPTS[7], "max_tokens": 80, "min_tokens": 80, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    wait_for(lambda: health(server)["running"] == 0, timeout=5)
    assert scheduler.stats["finished_cancelled"] == before + 1


def test_full_queue_answers_429_with_retry_after(small_server, monkeypatch):
    gate = threading.Event()
    slow_steps(monkeypatch, small_server.state.scheduler, gate=gate)
    body = {"model": MODEL, "prompt": PROMPTS[8], "max_tokens": 4, "temperature": 0}
    statuses = []

    def post():
        statuses.append(httpx.post(small_server.url + "/v1/completions", json=body, timeout=60).status_code)

    first, second = threading.Thread(target=post), threading.Thread(target=post)
    first.start()
    wait_for(lambda: health(small_server)["running"] == 1)  # in the slot, its prefill held at the gate
    second.start()
    wait_for(lambda: health(small_server)["waiting"] == 1)  # in the queue
    try:
        response = httpx.post(small_server.url + "/v1/completions", json=body)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert scrape(small_server)[("llama_requests_total", (("reason", "rejected"),))] >= 1
    finally:
        gate.set()
        first.join(timeout=30)
        second.join(timeout=30)
    assert statuses == [200, 200]


def test_request_timeout(small_server, monkeypatch):
    slow_steps(monkeypatch, small_server.state.scheduler, seconds=0.05)
    monkeypatch.setattr(small_server.state.server, "request_timeout", 0.3)
    body = {"model": MODEL, "prompt": PROMPTS[9], "max_tokens": 50, "min_tokens": 50, "temperature": 0}
    response = httpx.post(small_server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"

    with httpx.stream("POST", small_server.url + "/v1/completions", json={**body, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line]
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    assert events[-1] == "data: [DONE]"
    wait_for(lambda: health(small_server)["running"] == 0)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(server, monkeypatch, reference):
    scheduler = server.state.scheduler
    run = scheduler.runner.run
    calls = []

    def fail_once(step):
        calls.append(step)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return run(step)

    monkeypatch.setattr(scheduler.runner, "run", fail_once)
    response = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPTS[11], "max_tokens": 3})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error: boom", "type": "server_error", "param": None,
                                        "code": None}
    body = {"prompt": PROMPTS[11], "max_tokens": 5, "temperature": 0}
    response = httpx.post(server.url + "/v1/completions", json=body)
    assert response.json()["choices"][0]["text"] == greedy(reference, PROMPTS[11], 5)


# --- Bad requests ------------------------------------------------------------------------------------

LONG_PROMPT = "word " * (2 * MAX_SEQ_LEN)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "model"),
    ({"prompt": LONG_PROMPT[:3000]}, 400, "prompt"),  # longer than the context
    ({"prompt": "Hi", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),  # prompt + answer exceed the context
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "Hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "Hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "Hi", "n": 9}, 400, "n"),  # more choices than rows (8)
    ({"prompt": "Hi", "n": 0}, 400, "n"),
    ({"prompt": ["Hi", "Ho"]}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": "Hi", "frobnicate": True}, 400, "frobnicate"),
    ({"max_tokens": 3}, 400, "prompt"),  # no prompt
])
def test_bad_completion_requests(server, body, status, param):
    response = httpx.post(server.url + "/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_sampling_errors_reuse_the_library_messages(server):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "temperature": -1})
    assert response.json()["error"]["message"] == "temperature must be >= 0 (0 is greedy), got -1.0"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 99, "logprobs": True}, "top_logprobs"),
])
def test_bad_chat_requests(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_malformed_and_oversized_bodies(server):
    headers = {"content-type": "application/json"}
    response = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "Hi",', headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers=headers)
    assert response.status_code == 400
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 5000})  # max_body_bytes=4096
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = httpx.get(server.url + "/v1/nowhere")
    assert response.status_code == 404 and "error" in response.json()


def test_errors_raise_in_the_openai_client_and_the_server_keeps_serving(client, reference):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="Hi", top_p=0)
    response = client.completions.create(model=MODEL, prompt=PROMPTS[10], max_tokens=5, temperature=0)
    assert response.choices[0].text == greedy(reference, PROMPTS[10], 5)


def test_scheduler_keeps_rows_compacted_under_churn(server, reference):
    """Requests finishing at different steps move rows around; every answer stays the library's."""
    scheduler = server.state.scheduler
    assert all(seq.row == i for i, seq in enumerate(scheduler.running))
    prompts = PROMPTS[:12]
    lengths = [1, 9, 2, 7, 3, 12, 1, 5, 8, 2, 11, 4]
    results = [None] * len(prompts)

    def ask(i):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
        results[i] = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [greedy(reference, p, n) for p, n in zip(prompts, lengths)]
    assert torch.is_inference_mode_enabled() is False  # the scheduler's inference mode stays in its thread


# --- Sharded: rank 0 serves, every rank runs the model -----------------------------------------------


def test_two_shards_under_torchrun_serve_the_same_text(tiny_checkpoints, llama3_tokenizer_path, reference):
    """torchrun, 2 ranks (gloo): rank 0 broadcasts each step; concurrent answers equal the unsharded library's."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "llama.serve", "--ckpt-dir", str(tiny_checkpoints["gqa-2shards"]),
               "--tokenizer", str(llama3_tokenizer_path), "--model-name", MODEL, "--max-seq-len", str(MAX_SEQ_LEN),
               "--max-batch-size", "3", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the sharded server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompts, lengths = PROMPTS[:5], [4, 9, 6, 12, 3]  # more requests than the 3 slots
        expected = [greedy(reference, p, n) for p, n in zip(prompts, lengths)]
        assert stream_concurrently(client, prompts, lengths) == expected
        # Prefix caching (on by default): the second time, both ranks load the prompt's blocks from their store.
        long_prompt = PROMPTS[5] * 3
        for _ in range(2):
            response = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=5, temperature=0)
            assert response.choices[0].text == greedy(reference, long_prompt, 5)
        assert httpx.get(url + "/health").json()["prefix_cache_hit_rate"] > 0
    finally:
        process.send_signal(signal.SIGINT)  # rank 0 shuts down gracefully and releases rank 1
        output = process.communicate(timeout=60)[0]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output  # both left cleanly


# --- Compiled decoding --------------------------------------------------------------------------------


def test_compiled_server_answers_equal_eager(tiny_checkpoints, llama3_tokenizer_path, reference):
    """`llama serve --compile`: the server's engine runs the compiled decode step (one slot: one
    compilation; the other requests queue) and answers what the eager library answers."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=1,
                        device="cpu", compile=True)
    app = create_app(llama, model_name=MODEL, queue_size=4, request_timeout=None)
    prompts, max_tokens = PROMPTS[:4], [5, 9, 3, 7]
    with running_server(app) as url:
        def ask(i):
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0}
            return httpx.post(url + "/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]

        results = [ask(0)]  # alone: compiles the decode step
        threads = [threading.Thread(target=lambda i=i: results.append((i, ask(i)))) for i in range(1, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    answers = [results[0]] + [text for _, text in sorted(results[1:])]
    assert answers == [greedy(reference, p, n) for p, n in zip(prompts, max_tokens)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # the compiled step ran
    torch._dynamo.reset()


def test_speculative_server_answers_equal_plain_decoding(tiny_checkpoints, llama3_tokenizer_path, reference):
    """`llama serve --speculative int8`: concurrent greedy requests answer what plain decoding answers,
    the drafts are counted in /metrics, and a request with "speculative": false drafts nothing."""
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                        device="cpu", speculative="int8")
    app = create_app(llama, model_name=MODEL, queue_size=8, request_timeout=None)
    prompts, max_tokens = PROMPTS[:4], [12, 20, 6, 16]
    with running_server(app) as url:
        app.url = url

        def ask(i, **extra):
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0, **extra}
            return httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

        results = {}
        threads = [threading.Thread(target=lambda i=i: results.update({i: ask(i)})) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(4)] == [greedy(reference, p, n) for p, n in zip(prompts, max_tokens)]
        metrics = scrape(app)
        drafted = metrics[("llama_spec_decode_draft_tokens_total", ())]
        assert drafted > 0 and 0 < metrics[("llama_spec_decode_accepted_tokens_total", ())] <= drafted
        assert metrics[("llama_spec_decode_acceptance_rate", ())] == pytest.approx(
            metrics[("llama_spec_decode_accepted_tokens_total", ())] / drafted)
        assert ask(0, speculative=False) == results[0]
        assert scrape(app)[("llama_spec_decode_draft_tokens_total", ())] == drafted


# --- Structured outputs and tool calls ------------------------------------------------------------

SMALL_PERSON = {  # small enough for a random model's document to fit the tiny context
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "role", "tags", "address"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]
ASK = [{"role": "user", "content": "Time in Paris?"}]
TOOLS_SEQ_LEN = 640  # Llama 3.1's tool prompt is a few hundred tokens


@pytest.fixture(scope="module")
def tools_reference(tiny_checkpoints, llama3_tokenizer_path):
    return Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=TOOLS_SEQ_LEN, max_batch_size=1,
                       device="cpu")


@pytest.fixture(scope="module")
def tools_client(tiny_checkpoints, llama3_tokenizer_path):
    """The openai client of a server whose context holds tool prompts."""
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=TOOLS_SEQ_LEN, max_batch_size=4,
                        device="cpu")
    app = create_app(llama, model_name=MODEL, queue_size=16, request_timeout=120)
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def valid_calls(calls, names=("get_weather", "get_time")):
    """(name, arguments) of each call, once checked against its function's parameters."""
    jsonschema = pytest.importorskip("jsonschema")
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    result = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, parameters[call.function.name])
        result.append((call.function.name, arguments))
    return result


def test_structured_json_schema_outputs_validate_and_match_library(client, reference):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SMALL_PERSON}}

    def ask(seed):
        return client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed,
                                              response_format=response_format)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # batched in the server
        responses = list(pool.map(ask, range(8)))
    for seed, response in enumerate(responses):
        content = response.choices[0].message.content
        jsonschema.validate(json.loads(content), SMALL_PERSON)
        assert response.choices[0].finish_reason == "stop"
        expected = reference.chat_completion([ASK], temperature=1.0, top_p=1.0, seed=seed, json_schema=SMALL_PERSON)
        assert content == expected[0]["generation"]["content"]
    response = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=0, max_tokens=60,
                                              response_format={"type": "json_object"})
    if response.choices[0].finish_reason == "stop":  # any object: it may run to the length limit
        assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_tool_choice_required_returns_valid_calls(tools_client):
    pytest.importorskip("llguidance")
    client = tools_client
    response = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=3, n=3, tools=TOOLS,
                                              tool_choice="required")
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(valid_calls(choice.message.tool_calls)) == 1  # Llama 3 calls one tool at a time
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=4, tools=TOOLS,
                                              tool_choice=named)
    valid_calls(response.choices[0].message.tool_calls, names=["get_weather"])


def test_streamed_tool_calls_reassemble_to_the_whole_response(tools_client):
    pytest.importorskip("llguidance")
    client = tools_client
    options = dict(model=MODEL, messages=ASK, temperature=1.0, tools=TOOLS, tool_choice="required")
    for seed in range(3):
        whole = client.chat.completions.create(seed=seed, **options).choices[0]
        calls = {}  # index -> {"id", "name", "arguments"}
        finish_reasons = []
        for chunk in client.chat.completions.create(seed=seed, stream=True, **options):
            delta = chunk.choices[0].delta
            assert not delta.content
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
            finish_reasons.append(chunk.choices[0].finish_reason)
        streamed = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
        assert streamed == valid_calls(whole.message.tool_calls)
        assert all(c["id"].startswith("call_") for c in calls.values())
        assert finish_reasons[-1] == "tool_calls"


def test_tool_messages_reach_the_chat_format(tools_client, tools_reference):
    """A dialog with an earlier call and its result (role tool, tool_call_id) is the library's prompt."""
    client, reference = tools_client, tools_reference
    dialog = [*ASK,
              {"role": "assistant", "content": None, "tool_calls": [{
                  "id": "call_1", "type": "function",
                  "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "14:05"}]
    response = client.chat.completions.create(model=MODEL, messages=dialog, temperature=0, max_tokens=6, tools=TOOLS)
    assert response.usage.prompt_tokens == len(reference.formatter.encode_dialog_prompt(dialog, TOOLS))
    [expected] = reference.chat_completion([dialog], temperature=0, max_gen_len=6, tools=TOOLS)
    assert response.choices[0].message.content == expected["generation"]["content"]
    assert response.choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "int"}}}},
     "response_format"),
])
def test_bad_tool_and_response_format_requests(tools_client, extra, param):
    pytest.importorskip("llguidance")
    response = httpx.post(str(tools_client.base_url) + "chat/completions", json={"messages": ASK, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param

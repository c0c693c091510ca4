"""The real server with the real openai client: results equal Engine's, the errors a client can cause,
concurrent streams, a full queue, a client that leaves mid-stream, SIGTERM under load."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Capital of France? 🇫🇷"}]
GREEDY = dict(temperature=0.0)
POLLS = 300   # bounded waits: at most this many polls 0.1 s apart


def expected(engine, prompt, max_tokens: int, temperature: float = 0.0, seed: int | None = None):
    """What Engine alone generates: (text, completion tokens, finish reason)."""
    ids = engine.encode_chat(prompt) if isinstance(prompt, list) else engine.encode_prompt(prompt)
    stops = set(engine.text_settings["stop_tokens"])
    top_p = engine.text_settings["sampling"]["top_p"]
    tokens = list(engine.stream(ids, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_tokens=tuple(stops)))
    text = (engine.chat if isinstance(prompt, list) else engine.complete)(prompt, max_tokens, temperature=temperature,
                                                                           seed=seed)
    return text, len(tokens), "stop" if tokens[-1] in stops else "length"


def long_prompt(engine, tokens: int = 200) -> str:
    """A prompt whose greedy continuation runs to `tokens` without a stop token (it keeps a row busy)."""
    for prompt in ("The capital of France is", "Emoji: ", "Once upon a time", "Hello"):
        if expected(engine, prompt, tokens)[2] == "length":
            return prompt
    pytest.fail(f"no candidate prompt runs to {tokens} tokens without a stop token on this build: add one")


def streamed_chat(client, **kwargs) -> tuple[str, str | None]:
    text, reason = [], None
    for chunk in client.chat.completions.create(model="m", stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f"l4compile_{name} ") or line.startswith(f"l4compile_{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition) -> None:
    for _ in range(POLLS):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("the condition did not hold within the bounded wait")


def test_models_health_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [server.build.name]
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("requests_total", "tokens_per_second", "queue_depth", "batch_occupancy", "generated_tokens_total"):
        assert f"# TYPE l4compile_{name} " in text


def test_chat_equals_engine_streamed_and_not(server, engine):
    client = server.client()
    text, tokens, reason = expected(engine, CHAT, 24)
    reply = client.chat.completions.create(model="m", messages=CHAT, max_tokens=24, **GREEDY)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == len(engine.encode_chat(CHAT))
    assert reply.usage.completion_tokens == tokens
    assert streamed_chat(client, messages=CHAT, max_tokens=24, **GREEDY) == (text, reason)


def test_completion_equals_engine_greedy_and_seeded(server, engine):
    client = server.client()
    prompt = "Once upon a time there was"
    text, tokens, reason = expected(engine, prompt, 30)
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=30, **GREEDY)
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens) == \
        (text, reason, tokens)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=30, stream=True, **GREEDY) if c.choices)
    assert streamed == text
    sampled = expected(engine, prompt, 30, temperature=0.8, seed=7)[0]
    assert client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0.8,
                                     seed=7).choices[0].text == sampled


def test_stop_string_cuts_the_text(server, engine):
    client = server.client()
    text = expected(engine, CHAT, 40)[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    want = text[:text.index(stop)]
    reply = client.chat.completions.create(model="m", messages=CHAT, max_tokens=40, stop=[stop], **GREEDY)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (want, "stop")
    assert streamed_chat(client, messages=CHAT, max_tokens=40, stop=stop, **GREEDY) == (want, "stop")


def test_usage_in_the_stream(server, engine):
    chunks = list(server.client().chat.completions.create(model="m", messages=CHAT, max_tokens=5, stream=True,
                                                          stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].usage.completion_tokens == expected(engine, CHAT, 5)[1]


@pytest.mark.parametrize("body, status, param", [
    (b'{"messages": [', 400, None),                                                     # malformed JSON
    (b'[1, 2]', 400, None),
    (json.dumps({"messages": CHAT, "max_tokens": "ten"}), 400, "max_tokens"),           # wrong types
    (json.dumps({"messages": CHAT, "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"messages": CHAT, "stream": 1}), 400, "stream"),
    (json.dumps({"messages": "hello"}), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role"),
    (json.dumps({"messages": CHAT, "top_p": 0}), 400, "top_p"),
    (json.dumps({"messages": CHAT, "n": 2}), 400, "n"),
    (json.dumps({"messages": CHAT, "max_tokens": 100000}), 400, "max_tokens"),          # context overflow
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}), 400, "messages[0].content[1]"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 70000}]}), 413, None),  # over --max-body-bytes
])
def test_bad_chat_requests(server, body, status, param):
    reply = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param, error


def test_bad_completion_requests(server):
    for body, param in [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 10**9]}, "prompt"),
                        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "seed": -1}, "seed"),
                        ({"prompt": "hi", "logprobs": 2}, "logprobs"), ({}, "prompt")]:
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, param), reply.text
    with pytest.raises(openai.BadRequestError, match="n=1"):
        server.client().completions.create(model="m", prompt="hi", n=3)


def test_concurrent_streams_equal_sequential(server, engine):
    """16 streaming clients at once, prompts of 2 to ~60 tokens (across chunk boundaries), 4 rows: each
    response equals that prompt generated alone."""
    prompts = [" ".join(["Hello, how are you today?"] * (1 + i % 6))[: 8 + 13 * i] for i in range(16)]
    lengths = [12 + 3 * (i % 5) for i in range(16)]
    want = [expected(engine, p, n)[0] for p, n in zip(prompts, lengths)]
    client = server.client()

    def run(i: int) -> str:
        return "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=prompts[i], max_tokens=lengths[i], stream=True, **GREEDY) if c.choices)

    steps, tokens = metric(server, "decode_steps_total"), metric(server, "generated_tokens_total")
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(16)))
    assert got == want
    steps, tokens = metric(server, "decode_steps_total") - steps, metric(server, "generated_tokens_total") - tokens
    assert steps < tokens - 16   # one at a time, each request's tokens after its first would take a step each


def test_disconnect_mid_stream_frees_the_row(server, engine):
    cancelled = metric(server, 'generations_total{outcome="cancelled"}')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": long_prompt(engine), "max_tokens": 200, "stream": True, **GREEDY}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    wait_for(lambda: metric(server, "batch_rows_active") == 0)
    assert metric(server, 'generations_total{outcome="cancelled"}') == cancelled + 1
    text = expected(engine, "Once upon", 8)[0]
    assert server.client().completions.create(model="m", prompt="Once upon", max_tokens=8,
                                              **GREEDY).choices[0].text == text


def test_full_queue_is_429_and_the_server_recovers(start_server, engine):
    """One row, a queue of one: a long stream holds the row, a second request waits, a third gets 429 with
    Retry-After (the openai client's RateLimitError); once the long stream's client leaves, the queued request
    and new ones are answered."""
    server = start_server("--max-batch", "1", "--max-queue", "1")
    client, long = server.client(), {"prompt": long_prompt(engine), "max_tokens": 200, "stream": True, **GREEDY}
    busy = None
    for _ in range(5):   # bounded retries: the long request must still run when the others arrive
        with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()   # kept: an iterator dropped here would close the connection
            assert next(line for line in lines if line.startswith("data:"))
            queued = ThreadPoolExecutor(1).submit(client.completions.create, model="m", prompt="Hello", max_tokens=4,
                                                  **GREEDY)
            wait_for(lambda: metric(server, "queue_depth") == 1 or queued.done())
            try:
                client.completions.create(model="m", prompt="Hi", max_tokens=4)
            except openai.RateLimitError as exc:
                busy = exc.response
            if busy is not None and not queued.done():
                break
    assert busy is not None and busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert queued.result(timeout=120).choices[0].text == expected(engine, "Hello", 4)[0]
    assert client.completions.create(model="m", prompt="Hello", max_tokens=4, **GREEDY).choices[0].text == \
        expected(engine, "Hello", 4)[0]
    assert metric(server, 'requests_total{endpoint="/v1/completions",status="429"}') >= 1


def test_sigterm_during_load_finishes_in_flight_requests(start_server, engine):
    server = start_server("--max-batch", "4")
    prompts = [f"Hello, how are you today? {'I am fine. ' * i}" for i in range(6)]
    want = [expected(engine, p, 40)[0] for p in prompts]
    client = server.client()
    started = [threading.Event() for _ in prompts]

    def run(i: int):
        text = []
        try:
            for chunk in client.completions.create(model="m", prompt=prompts[i], max_tokens=40, stream=True,
                                                   **GREEDY):
                started[i].set()
                text.append(chunk.choices[0].text if chunk.choices else "")
        except openai.APIError as exc:   # a clean error event is allowed; a hang or a cut stream is not
            started[i].set()
            return exc
        return "".join(text)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(run, i) for i in range(len(prompts))]
        for event in started[:4]:
            assert event.wait(120)
        server.terminate()
        results = [f.result(timeout=120) for f in futures]
    assert server.process.wait(60) == 143   # SIGTERM's conventional status, after a clean shutdown
    assert "Traceback" not in server.output() and "l4compile: terminated" in server.output()
    finished = [r for r in results if isinstance(r, str)]
    assert len(finished) >= 4
    assert all(r == w for r, w in zip(results, want) if isinstance(r, str))
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)

"""
scripts/chat_web.py on CPU with the tiny d2 base model, over real HTTP.

Two servers per module: `python -m scripts.chat_web` as the user starts it (flags, validation,
concurrency, both APIs), and the same app on a uvicorn thread in this process (4 batch rows,
8-token prefill chunks, a queue of 1), where a test can slow or break the worker's decode loop
(streams that outlast a check, a full queue, a failing step), watch the order of its events, and
compare replies with the Engine's on the same model object: a request in a batch gets exactly the
tokens it gets alone.
"""

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import uvicorn

from conftest import REPO_ROOT, child_env, free_port
from nanochat.common import ConfigError, MissingInputError
from nanochat.engine import Engine
from nanochat.tokenizer import IncrementalDecoder
from scripts import chat_web
from scripts.chat_web_api import StopScanner

MODEL_ID = "nanochat-base-for_loss-3"
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


# -----------------------------------------------------------------------------
# HTTP helpers


def call(port, method, path, body=None, headers=None, timeout=60):
    """-> (status, headers with lower-case names, body bytes)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def events_of(body):
    """The JSON payloads of an SSE body ([DONE] kept as the string)."""
    payloads = []
    for block in body.decode("utf-8").split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def upstream_text(port, messages, **fields):
    status, _, body = call(port, "POST", "/chat/completions", dict(messages=messages, **fields))
    assert status == 200, body
    events = events_of(body)
    assert events[-1] == {"done": True}, events[-3:]
    return "".join(event["token"] for event in events[:-1])


class OpenStream:
    """A streaming POST whose events are read one at a time, and that can hang up mid-stream."""

    def __init__(self, port, path, body):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        self.response = self.conn.getresponse()

    def next_event(self):
        while True:
            line = self.response.fp.readline()
            if not line:
                return None
            if line.startswith(b"data: "):
                data = line[len(b"data: "):].strip().decode("utf-8")
                return data if data == "[DONE]" else json.loads(data)

    def hang_up(self):
        """Close the connection mid-stream, as a browser tab that goes away (safe to call twice)."""
        sock = self.conn.sock
        self.response.close()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.conn.sock = None


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stats(port):
    return json.loads(call(port, "GET", "/stats")[2])


# -----------------------------------------------------------------------------
# The two servers


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_base_dir, tmp_path_factory):
    """python -m scripts.chat_web on the tiny base model; its port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("chat_web") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scripts.chat_web", "-i", "base", "-g", "for_loss", "--device-type", "cpu",
             "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO_ROOT, env=child_env(tiny_base_dir), stdout=log, stderr=subprocess.STDOUT)

    def ready():
        assert process.poll() is None, f"chat_web exited with {process.returncode}:\n{log_path.read_text()}"
        try:
            return json.loads(call(port, "GET", "/health", timeout=2)[2])["ready"]
        except OSError:
            return False

    try:
        wait_until(ready, 120, "chat_web to become ready")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20)


LOCAL_MAX_BATCH, LOCAL_MAX_CONTEXT, LOCAL_PREFILL_CHUNK = 4, 640, 8


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tiny_base_dir):
    """The app with one CPU worker (4 rows of up to 640 positions, 8-token prefill chunks, --max-queue 1) on a uvicorn thread here."""
    from nanochat.checkpoint_manager import load_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
        model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag="for_loss")
    worker = chat_web.make_worker(0, torch.device("cpu"), model, tokenizer, max_batch=LOCAL_MAX_BATCH,
                                  kv_cache_tokens=LOCAL_MAX_BATCH * LOCAL_MAX_CONTEXT, prefill_chunk=LOCAL_PREFILL_CHUNK)
    settings = chat_web.Settings(MODEL_ID, max_queue=1)
    app = chat_web.create_app([worker], settings)
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_until(lambda: uvicorn_server.started, 30, "the in-process server to start")
    yield SimpleNamespace(port=port, app=app, settings=settings, model=model, batcher=worker.batcher,
                          engine=Engine(model, tokenizer), tokenizer=tokenizer)
    uvicorn_server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture
def slow_steps(local, monkeypatch):
    """slow_steps(delay): every step of the worker's decode loop sleeps `delay` seconds first; returns the step counter [n]."""
    counter = [0]

    def install(delay):
        real_step = type(local.batcher).step.__get__(local.batcher)

        def slow_step():
            time.sleep(delay)
            counter[0] += 1
            real_step()
        monkeypatch.setattr(local.batcher, "step", slow_step, raising=False)
        return counter

    yield install
    wait_until(lambda: stats(local.port)["active_requests"] == 0, 10, "the batch to empty after the test")


@pytest.fixture
def endless(local, monkeypatch):
    """Replies run to max_tokens: the decode loop no longer sees the tokens that end a turn (the barely trained model may emit them any time)."""
    for name in ("assistant_end", "bos"):
        monkeypatch.setitem(local.batcher.special, name, -1)


@pytest.fixture
def event_log(local, monkeypatch):
    """Every (job, kind) the worker's decode loop publishes, in its order (a list filled while the test runs)."""
    log = []
    real_publish = local.batcher.publish

    def publish(events):
        log.extend((job, kind) for job, kind, _ in events)
        real_publish(events)
    monkeypatch.setattr(local.batcher, "publish", publish)
    return log


def greedy_ids(local, prompt, max_tokens, **kwargs):
    """The Engine's own greedy completion of prompt (the terminating token dropped)."""
    results, _ = local.engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0, **kwargs)
    return results[0][len(prompt):]


# -----------------------------------------------------------------------------
# Decoding and stop strings (no server)


def test_incremental_decoder_never_splits_multibyte_characters(tiny_tokenizer):
    text = "héllo 😀 东京 and more 🙂"
    ids = tiny_tokenizer.encode(text)
    assert any(tiny_tokenizer.decode([i]).endswith("\ufffd") for i in ids), "the tokenizer must split some character"
    decoder = IncrementalDecoder(tiny_tokenizer)
    pieces = [decoder.add(token) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == tiny_tokenizer.decode(ids) == text
    assert "😀" in pieces and "东" in "".join(pieces)  # the emoji arrived whole, once its 4 bytes were in


def test_incremental_decoder_flushes_an_incomplete_tail(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    decoder = IncrementalDecoder(tiny_tokenizer)
    streamed = "".join(decoder.add(token) for token in ids)
    assert not streamed.endswith("\ufffd")
    assert streamed + decoder.flush() == tiny_tokenizer.decode(ids)


def test_stop_scanner_finds_stop_strings_split_across_pieces():
    scanner = StopScanner(["END", "xyz"])
    out = [scanner.feed(piece) for piece in ["hello E", "N", "D and more"]]
    assert out == [("hello ", False), ("", False), ("", True)]
    scanner = StopScanner(["END"])
    assert scanner.feed("the E") == ("the ", False)
    assert scanner.feed("ND") == ("", True)
    scanner = StopScanner(["END"])
    assert scanner.feed("the EN") == ("the ", False)
    assert scanner.feed("d") == ("ENd", False)  # not a stop after all: released
    assert scanner.flush() == ""


# -----------------------------------------------------------------------------
# Validation: every bad request gets a 4xx that says what is wrong, and the server keeps serving

BAD_UPSTREAM = {
    "malformed_json": (b'{"messages": [', "not valid JSON"),
    "empty_body": (b"", "empty"),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    "not_an_object": (b"[1, 2]", "JSON object"),
    "no_messages": ({"messages": []}, "at least one message"),
    "501_messages": ({"messages": [{"role": "user", "content": "a"}] * 501}, "too many messages"),
    "system_role": ({"messages": [{"role": "system", "content": "be brief"}]}, "invalid role"),
    "unknown_role": ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid role"),
    "empty_content": ({"messages": [{"role": "user", "content": ""}]}, "empty content"),
    "list_content": ({"messages": [{"role": "user", "content": ["hi"]}]}, "must be a string"),
    "null_content": ({"messages": [{"role": "user", "content": None}]}, "must be a string"),
    "8001_chars": ({"messages": [{"role": "user", "content": "a" * 8001}]}, "too long"),
    "32001_total": ({"messages": [{"role": "user", "content": "a" * 6401}] * 5}, "conversation is too long"),
    "lone_surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    "temperature_5": ({"messages": HELLO, "temperature": 5}, "temperature"),
    "temperature_-1": ({"messages": HELLO, "temperature": -1}, "temperature"),
    "temperature_hot": ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    "top_k_-1": ({"messages": HELLO, "top_k": -1}, "top_k"),
    "top_k_201": ({"messages": HELLO, "top_k": 201}, "top_k"),
    "max_tokens_0": ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    "max_tokens_4097": ({"messages": HELLO, "max_tokens": 4097}, "max_tokens"),
}


@pytest.mark.parametrize("case", BAD_UPSTREAM, ids=list(BAD_UPSTREAM))
def test_upstream_rejects_bad_request_with_400_detail(server, case):
    body, expected = BAD_UPSTREAM[case]
    status, _, reply = call(server, "POST", "/chat/completions", body)
    assert status == 400, reply
    assert expected.lower() in json.loads(reply)["detail"].lower()
    assert json.loads(call(server, "GET", "/health")[2])["status"] == "ok"


BAD_OPENAI = {
    "malformed_json": (b"{not json", "not valid JSON", None),
    "empty_body": (b"", "empty", None),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "UTF-8", None),
    "no_messages": ({"messages": []}, "at least one message", "messages"),
    "501_messages": ({"messages": [{"role": "user", "content": "a"}] * 501}, "too many messages", "messages"),
    "tool_role": ({"messages": [{"role": "tool", "content": "42"}]}, "unsupported role", "messages"),
    "system_not_first": ({"messages": HELLO + [{"role": "assistant", "content": "hi"}, {"role": "system", "content": "x"},
                                               {"role": "user", "content": "y"}]}, "system", "messages"),
    "assistant_last": ({"messages": HELLO + [{"role": "assistant", "content": "hi"}]}, "last message", "messages"),
    "null_content": ({"messages": [{"role": "user", "content": None}]}, "must be a string", "messages"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "only text parts", "messages"),
    "8001_chars": ({"messages": [{"role": "user", "content": "a" * 8001}]}, "too long", "messages"),
    "temperature_5": ({"messages": HELLO, "temperature": 5}, "temperature", "temperature"),
    "top_p_1.5": ({"messages": HELLO, "top_p": 1.5}, "top_p", "top_p"),
    "n_0": ({"messages": HELLO, "n": 0}, "n must be", "n"),
    "max_tokens_0": ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "max_tokens"),
    "five_stops": ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
    "stream_yes": ({"messages": HELLO, "stream": "yes"}, "stream", "stream"),
    "seed_text": ({"messages": HELLO, "seed": "lucky"}, "seed must be an integer", "seed"),
}


@pytest.mark.parametrize("case", BAD_OPENAI, ids=list(BAD_OPENAI))
def test_openai_rejects_bad_request_in_openai_error_shape(server, case):
    body, expected, param = BAD_OPENAI[case]
    status, _, reply = call(server, "POST", "/v1/chat/completions", body)
    assert status == 400, reply
    error = json.loads(reply)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert expected.lower() in error["message"].lower() and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_server_still_serves_after_bad_requests_and_reports_itself(server):
    assert upstream_text(server, HELLO, max_tokens=4) is not None
    health = json.loads(call(server, "GET", "/health")[2])
    assert health == {"status": "ok", "ready": True, "num_gpus": 1, "available_workers": 1}
    pool = stats(server)
    assert (pool["total_workers"], pool["available_workers"], pool["busy_workers"]) == (1, 1, 0)
    assert (pool["active_requests"], pool["batch_rows"], pool["waiting_requests"]) == (0, 0, 0)
    assert [(w["gpu_id"], w["device"], w["max_batch"]) for w in pool["workers"]] == [(0, "cpu", chat_web.DEFAULT_MAX_BATCH)]
    models = json.loads(call(server, "GET", "/v1/models")[2])
    assert [m["id"] for m in models["data"]] == [MODEL_ID] and models["object"] == "list"
    status, _, reply = call(server, "GET", "/v1/models/gpt-4")
    assert status == 404 and json.loads(reply)["error"]["code"] == "model_not_found"
    status, _, reply = call(server, "GET", "/v1/no/such/thing")
    assert status == 404 and "message" in json.loads(reply)["error"]
    status, headers, _ = call(server, "GET", "/health", headers={"Origin": "http://elsewhere.example"})
    assert headers["access-control-allow-origin"] in ("*", "http://elsewhere.example")
    too_big = b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20) + b'"}]}'
    status, _, reply = call(server, "POST", "/chat/completions", too_big)
    assert status == 413 and "bytes" in json.loads(reply)["detail"]
    status, headers, page = call(server, "GET", "/")
    assert (status, headers["content-type"].startswith("text/html")) == (200 if chat_web.UI_HTML_PATH.exists() else 500, True)
    status, headers, logo = call(server, "GET", "/logo.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml") and b"<svg" in logo


# -----------------------------------------------------------------------------
# Serving (the real command line)


def test_upstream_stream_format_and_generation_capped_by_the_context(server):
    status, headers, body = call(server, "POST", "/chat/completions", {"messages": HELLO, "max_tokens": 4096, "temperature": 0})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = events_of(body)
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 and e["token"] for e in events[:-1])
    # the same request on /v1 says how many tokens that was: at most what the rotary tables hold (10 x 64)
    reply = json.loads(call(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 4096, "temperature": 0})[2])
    usage = reply["usage"]
    assert 1 <= usage["completion_tokens"] and usage["total_tokens"] <= 10 * 64
    assert reply["choices"][0]["message"]["content"] == "".join(e["token"] for e in events[:-1])


def test_twenty_concurrent_streams_all_finish(server):
    def one_client(i):
        if i % 2:
            return events_of(call(server, "POST", "/chat/completions", {"messages": HELLO, "max_tokens": 5})[2])[-1]
        return events_of(call(server, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 5, "stream": True})[2])[-1]

    with ThreadPoolExecutor(20) as pool:
        last_events = list(pool.map(one_client, range(20)))
    assert last_events == [{"done": True} if i % 2 else "[DONE]" for i in range(20)]
    assert stats(server)["available_workers"] == 1


def test_greedy_stream_equals_non_stream_on_both_endpoints(server):
    messages = [{"role": "user", "content": "Tell me about 东京 😀 please"}]
    upstream = upstream_text(server, messages, temperature=0, max_tokens=40)
    reply = json.loads(call(server, "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 40})[2])
    streamed = events_of(call(server, "POST", "/v1/chat/completions",
                              {"messages": messages, "temperature": 0, "max_tokens": 40, "stream": True})[2])
    deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1] if c["choices"])
    assert upstream == reply["choices"][0]["message"]["content"] == deltas
    assert len(upstream) > 0


# -----------------------------------------------------------------------------
# The OpenAI API against the Engine's own numbers (in-process server)


def test_openai_client_non_streaming_and_streaming_with_exact_usage(local):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{local.port}/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    prompt = local.tokenizer.render_conversation({"messages": messages})[0] + [local.tokenizer.encode_special("<|assistant_start|>")]
    expected = greedy_ids(local, prompt, 12)
    text = local.tokenizer.decode(expected)
    reason = "length" if len(expected) == 12 else "stop"

    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    reply = client.chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=12, user="u1")
    assert reply.object == "chat.completion" and reply.model == MODEL_ID and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))
    assert reply.usage.total_tokens == len(prompt) + len(expected)

    chunks = list(client.chat.completions.create(model="x", messages=messages, temperature=0, max_completion_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    no_usage = list(client.chat.completions.create(model="x", messages=messages, max_tokens=3, stream=True))
    assert all(c.usage is None for c in no_usage) and all(c.choices for c in no_usage)


def test_upstream_greedy_text_is_the_engines(local):
    prompt = chat_web.api.upstream_prompt(local.tokenizer, HELLO)
    assert upstream_text(local.port, HELLO, temperature=0, max_tokens=20) == local.tokenizer.decode(greedy_ids(local, prompt, 20))


def test_n_samples_with_seed_are_the_engines_batch(local):
    prompt = chat_web.api.openai_prompt(local.tokenizer, HELLO)
    body = {"messages": HELLO, "n": 3, "seed": 1234, "temperature": 1.0, "max_tokens": 8}
    reply = json.loads(call(local.port, "POST", "/v1/chat/completions", body)[2])
    results, _ = local.engine.generate_batch(prompt, num_samples=3, max_tokens=8, temperature=1.0, top_k=50, seed=1234)
    completions = [row[len(prompt):] for row in results]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in reply["choices"]] == [local.tokenizer.decode(c) for c in completions]
    assert reply["usage"]["completion_tokens"] == sum(len(c) for c in completions)
    assert json.loads(call(local.port, "POST", "/v1/chat/completions", body)[2])["choices"] == reply["choices"]
    chunks = events_of(call(local.port, "POST", "/v1/chat/completions", dict(body, stream=True))[2])[:-1]
    streamed = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == [c["message"]["content"] for c in reply["choices"]]


def test_stop_string_cuts_the_text_streaming_and_not(local):
    prompt = chat_web.api.openai_prompt(local.tokenizer, HELLO)
    full = local.tokenizer.decode(greedy_ids(local, prompt, 30))
    assert len(full) >= 12, full
    stop = full[6:9]
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 30, "stop": [stop, "never appears \u2603"]}
    reply = json.loads(call(local.port, "POST", "/v1/chat/completions", body)[2])
    assert reply["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"
    streamed = events_of(call(local.port, "POST", "/v1/chat/completions", dict(body, stream=True))[2])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1]) == full[:full.index(stop)]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop" and streamed[-1] == "[DONE]"


# -----------------------------------------------------------------------------
# Continuous batching (in-process server): replies, joins and leaves, the queue


def openai_reply(port, body):
    status, _, reply = call(port, "POST", "/v1/chat/completions", body)
    assert status == 200, reply
    return json.loads(reply)


def engine_texts(local, messages, n=1, **kwargs):
    """What the Engine alone generates for an OpenAI request: one text per sample."""
    prompt = chat_web.api.openai_prompt(local.tokenizer, messages)
    results, _ = local.engine.generate_batch(prompt, num_samples=n, **kwargs)
    return [local.tokenizer.decode(row[len(prompt):]) for row in results]


def test_concurrent_requests_get_the_replies_they_get_alone(local, monkeypatch):
    # 8 requests on 4 rows: they queue, join as others leave, and share decode steps
    monkeypatch.setattr(local.app.state.pool, "max_queue", 16)
    cases = [dict(temperature=0, max_tokens=30), dict(temperature=1.0, seed=11, max_tokens=12),
             dict(temperature=0.7, top_k=5, seed=12, max_tokens=25), dict(temperature=1.0, n=2, seed=13, max_tokens=9),
             dict(temperature=0, max_tokens=4), dict(temperature=1.2, top_p=0.8, seed=14, max_tokens=20),
             dict(temperature=0.9, seed=15, max_tokens=16, n=3), dict(temperature=0, max_tokens=18)]
    conversations = [[{"role": "user", "content": f"Tell me about the old king and a small bird, part {i}"}] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: openai_reply(local.port, dict(messages=conversations[i], **cases[i])), range(8)))
    for messages, case, reply in zip(conversations, cases, replies):
        case = dict(case)
        n, seed = case.pop("n", 1), case.pop("seed", 0)
        expected = engine_texts(local, messages, n=n, seed=seed, top_k=case.pop("top_k", 50), **case)
        assert [choice["message"]["content"] for choice in reply["choices"]] == expected, case


def test_a_stream_is_unchanged_by_requests_joining_and_leaving_its_batch(local, slow_steps):
    slow_steps(0.02)
    body = {"messages": HELLO, "temperature": 1.0, "seed": 21, "max_tokens": 120, "stream": True}
    stream = OpenStream(local.port, "/v1/chat/completions", body)
    pieces = [stream.next_event()]
    for i in range(3):  # short requests come and go while the stream runs
        assert upstream_text(local.port, [{"role": "user", "content": f"question {i}"}], max_tokens=3 + i) is not None
    assert stats(local.port)["active_requests"] == 1  # the others left; the stream is still running
    while pieces[-1] != "[DONE]":
        pieces.append(stream.next_event())
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in pieces[:-1] if p["choices"])
    assert text == engine_texts(local, HELLO, seed=21, temperature=1.0, top_k=50, max_tokens=120)[0]


def test_per_request_stop_strings_and_max_tokens_hold_in_one_batch(local, monkeypatch):
    monkeypatch.setattr(local.app.state.pool, "max_queue", 16)
    conversations = [[{"role": "user", "content": text}] for text in ("A red house?", "The quiet sea.", "Many stars!", "Hi")]
    full = [engine_texts(local, messages, temperature=0, max_tokens=40)[0] for messages in conversations]
    assert all(len(text) >= 12 for text in full), full
    bodies = [dict(messages=conversations[0], temperature=0, max_tokens=40, stop=[full[0][5:8]]),
              dict(messages=conversations[1], temperature=0, max_tokens=3),
              dict(messages=conversations[2], temperature=0, max_tokens=40, stop=[full[2][8:10], "never \u2603"]),
              dict(messages=conversations[3], temperature=0, max_tokens=40)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: openai_reply(local.port, body)["choices"][0], bodies))
    assert replies[0]["message"]["content"] == full[0][:full[0].index(full[0][5:8])] and replies[0]["finish_reason"] == "stop"
    assert replies[1]["message"]["content"] == engine_texts(local, conversations[1], temperature=0, max_tokens=3)[0]
    assert replies[1]["finish_reason"] in ("length", "stop")
    assert replies[2]["message"]["content"] == full[2][:full[2].index(full[2][8:10])] and replies[2]["finish_reason"] == "stop"
    assert replies[3]["message"]["content"] == full[3]


def test_a_long_prompt_is_prefilled_in_chunks_between_other_streams_steps(local, event_log, endless):
    short = OpenStream(local.port, "/chat/completions", {"messages": HELLO, "temperature": 0, "max_tokens": 400})
    assert "token" in short.next_event()
    long_messages = [{"role": "user", "content": "the old king remembers the garden and a long road. " * 30}]
    long_prompt = chat_web.api.upstream_prompt(local.tokenizer, long_messages)
    chunks = -(-len(long_prompt) // LOCAL_PREFILL_CHUNK)
    assert chunks >= 20, len(long_prompt)
    try:
        assert upstream_text(local.port, long_messages, temperature=0, max_tokens=2) is not None
    finally:
        short.hang_up()
    long_job = next(job for job, _ in event_log if len(job.request.tokens) == len(long_prompt))
    admitted = event_log.index((long_job, "admitted"))
    first_token = event_log.index((long_job, "tokens"))
    other_tokens = [job for job, kind in event_log[admitted:first_token] if kind == "tokens" and job is not long_job]
    # one decode step of the running stream after each chunk of the long prompt
    assert len(other_tokens) >= chunks - 1, (len(other_tokens), chunks)


def test_health_answers_while_a_stream_runs(local, slow_steps, endless):
    slow_steps(1.0)
    stream = OpenStream(local.port, "/chat/completions", {"messages": HELLO, "max_tokens": 4096, "temperature": 0})
    try:
        assert "token" in stream.next_event()  # the first step is out: the decode loop now sleeps in its thread
        started = time.monotonic()
        health = json.loads(call(local.port, "GET", "/health")[2])
        assert time.monotonic() - started < 0.9  # well within one step: nothing waits for the decode loop
        assert health["available_workers"] == 1  # 3 of its 4 rows are free
        now = stats(local.port)
        assert (now["busy_workers"], now["active_requests"], now["batch_rows"], now["waiting_requests"]) == (1, 1, 1, 0)
    finally:
        stream.hang_up()


def test_client_that_disconnects_frees_its_row_at_once(local, slow_steps, endless):
    steps = slow_steps(0.1)
    leaving = OpenStream(local.port, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True})
    staying = OpenStream(local.port, "/chat/completions", {"messages": HELLO, "max_tokens": 30, "temperature": 1.0})
    assert leaving.next_event()["choices"][0]["delta"]["role"] == "assistant"
    assert "token" in staying.next_event()
    wait_until(lambda: stats(local.port)["batch_rows"] == 2, 5, "both streams in the batch")
    leaving.hang_up()
    wait_until(lambda: stats(local.port)["batch_rows"] == 1, 5, "the row to be freed after the disconnect")
    events = [staying.next_event()]
    while events[-1] != {"done": True}:
        events.append(staying.next_event())
    wait_until(lambda: stats(local.port)["active_requests"] == 0, 5, "the batch to empty")
    stopped_at = steps[0]
    time.sleep(0.5)
    assert steps[0] == stopped_at  # an empty batch does not step


def test_non_streaming_client_that_disconnects_frees_its_row(local, slow_steps, endless):
    steps = slow_steps(0.1)
    body = json.dumps({"messages": HELLO, "max_tokens": 400, "temperature": 0}).encode()
    client = socket.create_connection(("127.0.0.1", local.port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: steps[0] >= 3, 5, "a few decode steps")
    client.close()
    wait_until(lambda: stats(local.port)["active_requests"] == 0, 5, "the row to be freed after the disconnect")
    stopped_at = steps[0]
    time.sleep(0.5)
    assert steps[0] == stopped_at < 100  # generation stopped, far before its 400 tokens


def test_full_queue_gets_503_with_retry_after(local, slow_steps, endless):
    slow_steps(0.1)
    holders = [OpenStream(local.port, "/chat/completions", {"messages": HELLO, "max_tokens": 400, "temperature": 0})
               for _ in range(LOCAL_MAX_BATCH)]
    try:
        for holder in holders:
            holder.next_event()
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(call, local.port, "POST", "/chat/completions", {"messages": HELLO, "max_tokens": 2})
            wait_until(lambda: stats(local.port)["waiting_requests"] == 1, 5, "a request waiting for a row")
            status, headers, reply = call(local.port, "POST", "/chat/completions", {"messages": HELLO})
            assert status == 503 and int(headers["retry-after"]) > 0 and "busy" in json.loads(reply)["detail"]
            status, headers, reply = call(local.port, "POST", "/v1/chat/completions", {"messages": HELLO})
            assert status == 503 and "retry-after" in headers and json.loads(reply)["error"]["type"] == "server_error"
            holders[0].hang_up()
            status, _, body = waiter.result(timeout=30)
        assert status == 200 and events_of(body)[-1] == {"done": True}
    finally:
        for holder in holders:
            holder.hang_up()


def test_a_burst_gets_rows_a_queue_and_503s_and_every_accepted_reply_completes(local, slow_steps, endless):
    slow_steps(0.05)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: call(local.port, "POST", "/chat/completions",
                                               {"messages": HELLO, "max_tokens": 40, "temperature": 1.0}), range(12)))
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= LOCAL_MAX_BATCH + 1 and 503 in statuses, statuses
    for status, headers, body in results:
        if status == 200:
            assert events_of(body)[-1] == {"done": True}
        else:
            assert int(headers["retry-after"]) > 0 and "retry" in json.loads(body)["detail"]
    now = stats(local.port)
    assert (now["active_requests"], now["waiting_requests"], now["batch_rows"]) == (0, 0, 0)


def test_a_request_that_waits_past_max_wait_gets_503(local, slow_steps, endless, monkeypatch):
    slow_steps(0.1)
    monkeypatch.setattr(local.settings, "max_wait", 0.5)
    holders = [OpenStream(local.port, "/chat/completions", {"messages": HELLO, "max_tokens": 400, "temperature": 0})
               for _ in range(LOCAL_MAX_BATCH)]
    try:
        for holder in holders:
            holder.next_event()
        status, headers, reply = call(local.port, "POST", "/v1/chat/completions", {"messages": HELLO})
        assert status == 503 and "retry-after" in headers and "no free row within 0.5 s" in json.loads(reply)["error"]["message"]
        assert stats(local.port)["waiting_requests"] == 0  # it left the queue
    finally:
        for holder in holders:
            holder.hang_up()


def test_stats_report_the_rate_and_the_longest_first_token_wait(local):
    assert upstream_text(local.port, HELLO, max_tokens=20, temperature=0) is not None
    now = stats(local.port)
    assert now["tokens_per_s"] > 0 and now["longest_first_token_wait_s"] > 0 and now["max_wait_s"] == local.settings.max_wait
    assert now["workers"][0]["max_batch"] == LOCAL_MAX_BATCH and now["workers"][0]["tokens_generated"] >= 1


def test_a_failing_decode_step_ends_the_response_with_an_error_and_frees_its_rows(local, monkeypatch):
    def broken(ids, kv_cache=None):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(local.model, "forward", broken)
    status, _, body = call(local.port, "POST", "/chat/completions", {"messages": HELLO, "max_tokens": 50})
    events = events_of(body)
    assert status == 200 and "injected failure" in events[-1]["error"] and {"done": True} not in events
    assert stats(local.port)["batch_rows"] == 0

    status, _, reply = call(local.port, "POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 50})
    assert status == 500 and "injected failure" in json.loads(reply)["error"]["message"]
    from openai import APIError, OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{local.port}/v1", api_key="x", max_retries=0)
    with pytest.raises(APIError, match="injected failure"):
        list(client.chat.completions.create(model="x", messages=HELLO, max_tokens=50, stream=True))
    monkeypatch.undo()
    assert upstream_text(local.port, HELLO, max_tokens=3) is not None  # the loop goes on


# -----------------------------------------------------------------------------
# The UI page and start-up errors


def test_ui_page_is_served_same_origin_or_says_it_is_missing(local, tmp_path, monkeypatch):
    page = tmp_path / "ui.html"
    page.write_text("<script>\n    const API_URL = `http://${window.location.hostname}:8000`;\n</script>\n", encoding="utf-8")
    monkeypatch.setattr(chat_web, "UI_HTML_PATH", page)
    status, headers, html = call(local.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "    const API_URL = '';" in html.decode() and "8000" not in html.decode()
    monkeypatch.setattr(chat_web, "UI_HTML_PATH", tmp_path / "absent.html")
    status, _, html = call(local.port, "GET", "/")
    assert status == 500 and b"missing" in html


def test_bad_start_up_flags_are_user_errors(tiny_checkpoint, tiny_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
    with pytest.raises(ConfigError, match="needs CUDA"):
        chat_web.main(["--num-gpus", "2", "--device-type", "cpu"])
    with pytest.raises(MissingInputError, match="no_such_tag"):
        chat_web.main(["-i", "base", "-g", "no_such_tag", "--device-type", "cpu"])

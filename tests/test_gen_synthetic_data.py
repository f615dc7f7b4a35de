"""
dev/gen_synthetic_data.py against a stub OpenAI-compatible server on 127.0.0.1 that plays back
scripted replies: valid conversations land in a file CustomJSON loads, server errors and
malformed replies are retried, a rejected key (401) stops at once, a reply that stays malformed
fails with one line, inputs that are missing stop before any request, and no error loses the
lines already written.
"""

import json
import threading

import pytest

from conftest import LocalHTTPServer, QuietHandler
from dev.gen_synthetic_data import build_prompt, main as gen_main
from nanochat.common import run_script
from tasks.customjson import CustomJSON


def completion(content):
    return 200, json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def conversation_reply(n):
    messages = [{"role": "user", "content": f"hi {n}"}, {"role": "assistant", "content": f"Hello! I am nanochat ({n})."}]
    return completion(json.dumps({"messages": messages}))


class StubServer(LocalHTTPServer):
    """Answers POST /v1/chat/completions from a script of (status, body); records each request."""

    def __init__(self, replies):
        self.replies, self.requests, self.lock = list(replies), [], threading.Lock()
        stub = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    status, text = stub.replies.pop(0) if stub.replies else (500, "script exhausted")
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)
        self.url = f"{self.address}/v1"
        self.start()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "knowledge.md").write_text("nanochat is a small chat model trained end to end for about $100.\n")
    monkeypatch.setenv("TEST_API_KEY", "sk-test-123")
    monkeypatch.chdir(tmp_path)  # no stray .env from the repo is loaded
    return tmp_path


def run_gen(workdir, server_url, *flags, capsys):
    argv = ["--output", str(workdir / "out.jsonl"), "--knowledge", str(workdir / "knowledge.md"), "--api-key-env", "TEST_API_KEY",
            "--base-url", server_url, "--model", "stub-model", "--workers", "1", "--retry-backoff", "0", *flags]
    code = 0
    try:
        run_script(lambda: gen_main(argv), "gen_synthetic_data")
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().out


def test_retries_server_errors_and_malformed_replies_and_writes_what_customjson_loads(workdir, capsys):
    server = StubServer([(503, "busy"), completion("not json at all"), conversation_reply(0), (200, "{broken"),
                         conversation_reply(1), completion(json.dumps({"messages": [{"role": "assistant", "content": "x"}]})),
                         conversation_reply(2)])
    try:
        code, out = run_gen(workdir, server.url, "--num", "3", capsys=capsys)
    finally:
        server.close()
    assert code == 0, out
    assert len(server.requests) == 7  # 4 failed attempts retried
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test-123"
    assert first["body"]["model"] == "stub-model" and first["body"]["response_format"]["type"] == "json_schema"
    assert "nanochat is a small chat model" in first["body"]["messages"][0]["content"]
    task = CustomJSON(str(workdir / "out.jsonl"))
    assert task.problems == [] and task.num_examples() == 3
    assert task.get_example(0)["messages"][1]["content"] == "Hello! I am nanochat (0)."
    assert "Done: 3 new conversation(s)" in out


def test_prompts_vary_by_index_and_repeat_for_the_same_index():
    prompts = [build_prompt(i, "facts") for i in range(20)]
    assert len(set(prompts)) == 20
    assert build_prompt(7, "facts") == prompts[7]


def test_rejected_key_stops_at_once_and_keeps_the_lines_already_written(workdir, capsys):
    earlier = json.dumps([{"role": "user", "content": "old"}, {"role": "assistant", "content": "kept"}])
    (workdir / "out.jsonl").write_text(earlier + "\n")
    server = StubServer([(401, json.dumps({"error": {"message": "No auth credentials found", "code": 401}}))] * 5)
    try:
        code, out = run_gen(workdir, server.url, "--num", "4", capsys=capsys)
    finally:
        server.close()
    assert code == 2
    assert len(server.requests) == 1  # a 401 is not retried, and the other conversations are not tried
    line = out.strip().splitlines()[-1]
    assert line.startswith("gen_synthetic_data: the API key in TEST_API_KEY was rejected") and "HTTP 401" in line
    assert "0 new conversation(s) appended" in line and "(now 1)" in line
    assert (workdir / "out.jsonl").read_text() == earlier + "\n"


def test_reply_that_stays_malformed_fails_in_one_line_and_a_rerun_finishes(workdir, capsys):
    server = StubServer([conversation_reply(0)] + [completion("{\"messages\": 5}")] * 3)
    try:
        code, out = run_gen(workdir, server.url, "--num", "2", "--max-retries", "2", capsys=capsys)
    finally:
        server.close()
    assert code == 2
    line = out.strip().splitlines()[-1]
    assert "1 of 2 conversations failed after retries" in line and "not a valid conversation" in line and "(after 3 attempts)" in line
    assert CustomJSON(str(workdir / "out.jsonl")).num_examples() == 1

    server = StubServer([conversation_reply(1)])  # the re-run only asks for what is missing
    try:
        code, out = run_gen(workdir, server.url, "--num", "2", capsys=capsys)
    finally:
        server.close()
    assert code == 0 and len(server.requests) == 1
    assert [c["messages"][0]["content"] for c in CustomJSON(str(workdir / "out.jsonl")).conversations] == ["hi 0", "hi 1"]


@pytest.mark.parametrize("problem, message", [
    ("no_key", "TEST_API_KEY is not set: export it or put TEST_API_KEY=... in .env"),
    ("no_knowledge", "Knowledge base file not found:"),
])
def test_missing_inputs_stop_before_any_request(workdir, monkeypatch, capsys, problem, message):
    if problem == "no_key":
        monkeypatch.delenv("TEST_API_KEY")
    else:
        (workdir / "knowledge.md").unlink()
    server = StubServer([])
    try:
        code, out = run_gen(workdir, server.url, "--num", "1", capsys=capsys)
    finally:
        server.close()
    assert code == 2 and message in out
    assert server.requests == [] and not (workdir / "out.jsonl").exists()

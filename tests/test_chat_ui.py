"""
The web UI (nanochat/ui.html) in a real browser: scripts.chat_web serves the tiny base
checkpoint on CPU and headless Debian chromium, driven by playwright, chats with it: a streamed
reply, regenerate, edit, /clear, and the error banner once the server is gone.

Skips where /usr/bin/chromium is missing (dev/install.sh installs it where apt-get is available).
Screenshots of the page land in the test's tmp dir; on failure the path of one is printed.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO_ROOT, child_env, free_port

CHROMIUM = "/usr/bin/chromium"
MAX_REPLY_BYTES = 500  # the tiny model holds 640 positions (10 x its 64-token context); each turn adds a few tokens
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is missing (Debian's chromium; dev/install.sh installs it as root where apt-get exists)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (the dev extra: pip install -e '.[dev]')")


def server_command(port):
    return [sys.executable, "-m", "scripts.chat_web", "-i", "base", "-g", "for_loss", "--device-type", "cpu",
            "--host", "127.0.0.1", "--port", str(port)]


def wait_until_ready(url, proc, log_path, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"chat_web exited with {proc.returncode} before it was ready:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as res:
                if json.load(res).get("ready"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"chat_web was not ready after {timeout} s:\n{log_path.read_text()}")


def is_completion(request):
    return request.method == "POST" and request.url.endswith("/chat/completions")


@pytest.fixture
def chat_server(tiny_checkpoint, tiny_base_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "chat_web.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(server_command(port), cwd=REPO_ROOT, env=child_env(tiny_base_dir),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, proc, log_path)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_chat_ui_in_browser(chat_server, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=30_000)  # a 512-token reply on a shared CPU can take a while
    url, proc = chat_server
    screenshot = tmp_path / "chat_ui.png"  # the conversation (chat_ui_down.png: the error banner)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 750})
        page.set_default_timeout(30_000)
        page_errors = []
        page.on("pageerror", lambda err: page_errors.append(str(err)))
        chat_input = page.locator("#chat-input")
        banner = page.locator("#error-banner")
        replies = page.locator(".message.assistant")
        done_replies = page.locator(".message.assistant.done")
        users = page.locator(".message.user")

        def reply_to(action, carried_on=False):
            """
            Run action (it starts a reply) and wait for the reply to finish; returns the JSON body
            it sent. The barely trained model may stop at once: an empty reply is regenerated. So
            is, when the next turn carries the reply (carried_on), one too long for that turn to
            fit the model's 640 positions (a reply's text is at most one token per byte).
            """
            with page.expect_request(is_completion) as request:
                action()
            for _ in range(5):
                last = replies.last
                expect(last).to_have_class(re.compile(r"\b(done|empty)\b"))
                fits = not carried_on or len(last.text_content().encode()) <= MAX_REPLY_BYTES
                if "done" in last.get_attribute("class").split() and fits:
                    return request.value.post_data_json
                with page.expect_request(is_completion) as retry:
                    last.locator(".content").click()
                assert retry.value.post_data_json == request.value.post_data_json
            pytest.fail("5 empty or overlong replies in a row")

        def send(text):
            chat_input.fill(text)
            return reply_to(lambda: chat_input.press("Enter"))

        try:
            page.goto(url)
            expect(page.locator("#empty-state")).to_be_visible()
            page.wait_for_function("document.querySelector('header img').naturalWidth > 0")  # /logo.svg served
            expect(banner).to_be_hidden()  # the health ping at load found the server ready

            # slash commands change and show the sampling settings sent with each request
            chat_input.fill("/temperature")
            chat_input.press("Enter")
            expect(page.locator(".notice").last).to_have_text("Temperature is 0.8.")
            chat_input.fill("/topk 40")
            chat_input.press("Enter")
            expect(page.locator(".notice").last).to_have_text("Top-k set to 40.")

            # a message streams a reply into one assistant bubble
            body = send("Hello")
            assert body == {"messages": [{"role": "user", "content": "Hello"}],
                            "temperature": 0.8, "top_k": 40, "max_tokens": 512}
            expect(users).to_have_text(["Hello"])
            expect(replies).to_have_count(1)
            assert replies.first.text_content() != ""
            page.screenshot(path=str(screenshot))

            # click the reply: it is dropped and asked for again
            body = reply_to(lambda: replies.first.locator(".content").click(), carried_on=True)
            assert body["messages"] == [{"role": "user", "content": "Hello"}]
            expect(users).to_have_count(1)
            expect(replies).to_have_count(1)
            assert replies.first.text_content() != ""

            # a follow-up carries the whole conversation, the streamed reply exactly as shown
            body = send("And then?")
            assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
            assert body["messages"][1]["content"] == replies.first.text_content()
            expect(done_replies).to_have_count(2)

            # click the first user message: its text comes back to the input, the conversation
            # restarts from there
            users.first.locator(".content").click()
            expect(chat_input).to_have_value("Hello")
            expect(page.locator(".message")).to_have_count(0)
            body = send("Hi again")
            assert body["messages"] == [{"role": "user", "content": "Hi again"}]
            expect(users).to_have_text(["Hi again"])
            expect(done_replies).to_have_count(1)
            expect(replies).to_have_count(1)

            # /clear empties the conversation
            chat_input.fill("/clear")
            chat_input.press("Enter")
            expect(page.locator(".message, .notice")).to_have_count(0)
            expect(page.locator("#empty-state")).to_be_visible()

            # the server goes away: sending shows the error banner
            proc.terminate()
            proc.wait(timeout=10)
            chat_input.fill("Anyone there?")
            chat_input.press("Enter")
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("Cannot reach the nanochat server")
            expect(page.locator(".message.assistant.failed")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "chat_ui_down.png"))
            assert page_errors == []
        except BaseException:
            failure = tmp_path / "chat_ui_failure.png"
            try:
                page.screenshot(path=str(failure))
                print(f"screenshot of the page when the test failed: {failure}")
            except Exception as error:
                print(f"no screenshot of the failure ({error}); the last one taken: {screenshot}")
            raise
        finally:
            browser.close()
            expect.set_options(timeout=None)  # back to playwright's default

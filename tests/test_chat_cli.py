"""
scripts/chat_cli.py end to end on the tiny base model (tests/conftest.py's tiny_checkpoint): an
interactive session in a real pseudo-terminal (two answered turns, clear, quit; Ctrl-D), Ctrl-C,
single-prompt mode, the one-line error for a missing checkpoint, and the streaming of text that
never prints half a UTF-8 character.
"""

import subprocess
import sys

import pexpect
import pytest

from conftest import REPO_ROOT, child_env
from scripts import chat_cli
from nanochat.tokenizer import IncrementalDecoder

CHAT_CMD = ["-m", "scripts.chat_cli", "-i", "base", "-g", "for_loss", "--device-type", "cpu"]
TIMEOUT = 90  # seconds for any one expected line; a turn takes under a second, start-up ~5-10 s


@pytest.fixture(scope="module")
def chats(tiny_base_dir, tiny_checkpoint):
    """
    Every chat_cli process of this module, started at once so their start-ups (importing torch,
    loading the model: most of their time) overlap. Each test drives its own.
    """
    env = child_env(tiny_base_dir)

    def spawn():
        return pexpect.spawn(sys.executable, CHAT_CMD, cwd=REPO_ROOT, env=env, encoding="utf-8", timeout=TIMEOUT)

    def popen(*flags):
        return subprocess.Popen([sys.executable, *flags], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    started = dict(
        session=spawn(), ctrl_d=spawn(),
        prompt=popen(*CHAT_CMD, "-p", "Why is the sky blue?"),
        missing=popen("-m", "scripts.chat_cli", "-i", "sft", "--device-type", "cpu", "-p", "hi"),
    )
    yield started
    for child in started.values():
        if isinstance(child, pexpect.spawn):
            child.close(force=True)
        elif child.poll() is None:
            child.kill()


def finish(child):
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


def communicate(process):
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


def test_interactive_session_answers_two_turns_clears_and_quits(chats):
    child = chats["session"]
    child.expect_exact("User: ")
    for message in ("Hello there", "What is the capital of France?"):
        child.sendline(message)
        child.expect_exact("Assistant: ")
        child.expect_exact("User: ")  # the answer finished and the next prompt came up
    child.sendline("")  # empty input is ignored: straight back to the prompt
    child.expect_exact("User: ")
    child.sendline("clear")
    child.expect_exact("Conversation cleared.")
    child.expect_exact("User: ")
    child.sendline("quit")
    status, rest = finish(child)
    assert status == 0
    assert "Goodbye!" in rest and "Traceback" not in rest


def test_eof_at_the_prompt_exits_cleanly(chats):
    child = chats["ctrl_d"]
    child.expect_exact("User: ")
    child.sendeof()
    status, rest = finish(child)
    assert status == 0
    assert "Goodbye!" in rest and "Traceback" not in rest


def test_ctrl_c_at_the_prompt_says_goodbye_without_a_traceback(tiny_tokenizer, monkeypatch, capsys):
    # In-process, with the model load stubbed out: no answer is generated before the interrupt.
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_cli, "load_model", lambda *args, **kwargs: (None, tiny_tokenizer, {}))
    monkeypatch.setattr("builtins.input", interrupted)
    chat_cli.main(["--device-type", "cpu"])
    assert capsys.readouterr().out.rstrip().endswith("Goodbye!")


def test_prompt_flag_answers_once_and_exits(chats):
    returncode, stdout, stderr = communicate(chats["prompt"])
    assert returncode == 0, stderr
    assert stdout.count("Assistant: ") == 1
    assert "User:" not in stdout


def test_missing_checkpoint_is_one_line_naming_the_phase_to_run(chats):
    returncode, stdout, stderr = communicate(chats["missing"])
    assert returncode == 2
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    assert "no sft checkpoint in" in lines[0] and "run `python -m scripts.chat_sft` first" in lines[0]
    assert "(checkpoints of other phases exist: base" in lines[0]  # the base model of tiny_checkpoint is there
    assert "Traceback" not in stderr


class CountingDecoder:
    """The tokenizer surface IncrementalDecoder uses, over byte-level ids: decode(ids) as tiktoken does it."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_never_splits_a_utf8_character(tiny_tokenizer):
    text = "héllo 😀 东京"
    for tokenizer, ids in [(CountingDecoder(), list(text.encode("utf-8"))),  # one byte per id: every split
                           (tiny_tokenizer, tiny_tokenizer.encode(text))]:
        stream = IncrementalDecoder(tokenizer)
        pieces = [stream.add(token_id) for token_id in ids]
        pieces.append(stream.flush())
        assert all("\ufffd" not in piece for piece in pieces), pieces
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert sum(1 for piece in pieces if piece) > 3  # it streams, not just one piece at the end


class ScriptedEngine:
    """Yields a fixed answer token by token, as Engine.generate does (the terminating token included)."""

    def __init__(self, answer, rotary_seq_len=1000):
        self.answer = answer
        self.model = type("Model", (), {"rotary_seq_len": rotary_seq_len})()
        self.prompts = []

    def generate(self, tokens, num_samples, max_tokens, **sampling):
        self.prompts.append(list(tokens))
        for token in self.answer[:max_tokens]:
            yield [token], [1]


def test_each_turn_is_framed_and_every_answer_ends_with_assistant_end(tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    bos, assistant_end = tiny_tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    user = [special("<|user_start|>"), *tiny_tokenizer.encode("hi"), special("<|user_end|>"), special("<|assistant_start|>")]
    words = tiny_tokenizer.encode("the cat")
    for answer, kept in [(words, words + [assistant_end]),  # cut at the token limit: closed for it
                         (words + [assistant_end], words + [assistant_end])]:  # closed by the model: not twice
        engine = ScriptedEngine(answer)
        conversation = chat_cli.Conversation(engine, tiny_tokenizer, temperature=0.6, top_k=50)
        written = []
        conversation.answer("hi", written.append)
        assert engine.prompts == [[bos, *user]]
        assert conversation.tokens == [bos, *user, *kept]
        assert "".join(written) == "the cat"  # the end token is not printed
        conversation.answer("hi", written.append)  # the second turn sees the whole first one
        assert engine.prompts[1] == [bos, *user, *kept, *user]
        conversation.clear()
        assert conversation.tokens == [bos]

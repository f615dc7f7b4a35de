"""
Generate synthetic multi-turn conversations between a user and nanochat (the identity data that
midtraining and SFT mix in, so the model knows who it is) through any OpenAI-compatible chat
completions endpoint, OpenRouter by default.

    export OPENROUTER_API_KEY=sk-or-...        # or put it in .env (loaded with python-dotenv)
    python dev/gen_synthetic_data.py                           # 1000 conversations, 4 workers
    python dev/gen_synthetic_data.py --output my_sft.jsonl --num 200
    python dev/gen_synthetic_data.py --base-url http://localhost:8000/v1 --model my-model --api-key-env MY_KEY

Reads the knowledge file (default knowledge/self_knowledge.md: what the model should know about
itself: who made it, how it was trained, what it can and cannot do) and embeds it in every
prompt. Diversity comes from a topic, a user persona, a conversation dynamic, a length and five
example first messages drawn per conversation (seeded by its index, so a re-run draws the same).

Writes JSONL in the format tasks/customjson.py reads: one JSON array of {"role", "content"}
messages per line, user first, alternating, ending with the assistant (default
$NANOCHAT_BASE_DIR/identity_conversations.jsonl). Each reply is checked against that format
and appended as one whole line (fsynced); lines already in the file are kept and count towards
--num, so a run stopped by an error is finished by running it again.

Failures: a missing key or knowledge file stops before any request; a rejected key (401/403) or
another client error (a wrong model name, say) stops at once; rate limits, server errors,
timeouts and malformed replies are retried with exponential back-off, and a conversation still
failing after --max-retries is reported at the end. Every error exits with one line (code 2).
"""

import argparse
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests
from dotenv import load_dotenv

from nanochat.common import UserError, get_base_dir, parse_flags, run_script
from tasks.customjson import conversation_problem

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_MODEL = "google/gemini-2.5-flash"
DEFAULT_KNOWLEDGE = os.path.join("knowledge", "self_knowledge.md")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

TOPICS = [
    "who the assistant is and who made it", "how the assistant was trained, phase by phase",
    "what the assistant is good and bad at", "the assistant's size compared with large commercial models",
    "how the tokenizer works", "what pretraining data it saw", "whether it can browse the internet or remember past chats",
    "how much it cost to train", "how someone can train their own copy", "the open-source license and the code",
    "its knowledge cutoff and making mistakes", "the difference between base, midtrained and chat models",
    "languages it can speak", "doing arithmetic and using its calculator tool", "a casual greeting that turns into questions about it",
]
PERSONAS = [
    "a curious beginner who has never heard of language models", "a machine learning researcher asking precise questions",
    "a skeptical journalist", "a high-school student working on a project", "a software engineer who wants to run it at home",
    "a non-native English speaker writing short simple sentences", "a playful user who tries to trick the assistant",
    "a teacher preparing a lesson about AI", "a retired person chatting casually", "an impatient user who wants short answers",
]
DYNAMICS = [
    "the user asks one question and a follow-up", "the user starts skeptical and is gradually convinced",
    "the user misunderstands something and the assistant gently corrects it",
    "the user asks the assistant to pretend to be a different AI and it politely stays itself",
    "the user goes deeper and deeper into technical detail", "the user changes topic halfway through",
    "the user thanks the assistant and asks a last quick question",
]
FIRST_MESSAGES = [
    "hi", "Hello!", "hey there, who are you?", "What are you?", "are you chatgpt?", "yo", "Good morning :)",
    "Who made you?", "what can you do", "Can you tell me about yourself?", "hola", "Bonjour, tu parles français ?",
    "Hallo! Wer bist du?", "ciao, come stai?", "こんにちは", "你好，你是谁？", "Привет!", "olá, tudo bem?",
    "how were you trained?", "is this thing on?", "What's your name?", "are you smarter than me?",
    "how big are you?", "do you remember me from yesterday?", "what is nanochat", "help",
    "I'm bored, talk to me", "Are you open source?", "can you browse the web?", "hi! quick question",
]

CONVERSATION_SCHEMA = {
    "type": "object",
    "properties": {
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}},
                "required": ["role", "content"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["messages"],
    "additionalProperties": False,
}


class GenerationError(UserError):
    """The endpoint or the inputs make generation impossible; the message says what to fix."""


class RetryableError(Exception):
    """This attempt failed in a way another attempt may not (rate limit, server error, malformed reply)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate synthetic identity conversations through an OpenAI-compatible API",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default=None, help="JSONL to append to (default $NANOCHAT_BASE_DIR/identity_conversations.jsonl)")
    parser.add_argument("--num", type=int, default=1000, help="conversations the file should hold in the end (lines already there count)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible API root (…/v1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name at that endpoint")
    parser.add_argument("--api-key-env", default="OPENROUTER_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--knowledge", default=DEFAULT_KNOWLEDGE, help="what the model should know about itself (markdown)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-retries", type=int, default=5, help="retries per conversation after the first attempt")
    parser.add_argument("--retry-backoff", type=float, default=1.0, help="seconds; retry k waits backoff * 2^k")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="seeds the per-conversation draws (with the index)")
    return parse_flags(parser, argv)


# -----------------------------------------------------------------------------
# Prompts


def build_prompt(index, knowledge, seed=0):
    """The instruction for conversation `index`: the knowledge plus a seeded draw of topic, persona, dynamic, length and first messages."""
    rng = random.Random(seed * 1_000_003 + index)
    topic, persona, dynamic = rng.choice(TOPICS), rng.choice(PERSONAS), rng.choice(DYNAMICS)
    num_exchanges = rng.randint(1, 4)
    examples = "\n".join(f"- {message}" for message in rng.sample(FIRST_MESSAGES, 5))
    return f"""You write training data for a small open-source chat model called nanochat.
Write one realistic conversation between a user and nanochat, the assistant. nanochat answers
honestly from the facts below, says so when it does not know, and never claims to be another model.

Facts about nanochat:
<knowledge>
{knowledge.strip()}
</knowledge>

This conversation:
- topic: {topic}
- the user is {persona}
- how it goes: {dynamic}
- {num_exchanges} user message(s), each answered by the assistant; the assistant speaks last
- the first user message is in the style of one of these (vary it, do not copy it):
{examples}

Reply with JSON only: {{"messages": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}, ...]}}"""


def request_body(prompt, args):
    return {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": args.temperature,
        "response_format": {"type": "json_schema", "json_schema": {"name": "conversation", "strict": True, "schema": CONVERSATION_SCHEMA}},
    }


# -----------------------------------------------------------------------------
# One conversation: request, check, retry


def validated_messages(reply_text):
    """The messages of a chat-completions response body, or RetryableError saying what is malformed."""
    try:
        body = json.loads(reply_text)
        content = body["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise RetryableError(f"malformed response body ({type(error).__name__}: {error}): {reply_text[:200]!r}") from None
    try:
        messages = json.loads(content)["messages"] if isinstance(content, str) else None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RetryableError(f"the reply is not the requested JSON ({type(error).__name__}: {error}): {str(content)[:200]!r}") from None
    problem = conversation_problem(messages)
    if problem is None and messages[-1]["role"] != "assistant":
        problem = "the assistant must speak last"
    if problem is None and any(not m["content"].strip() for m in messages):
        problem = "a message is empty"
    if problem:
        raise RetryableError(f"the reply is not a valid conversation: {problem}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def request_once(session, url, headers, body, args):
    try:
        response = session.post(url, headers=headers, json=body, timeout=args.timeout)
    except requests.RequestException as error:  # connection refused, reset, timeout
        raise RetryableError(f"request failed ({type(error).__name__}: {error})") from None
    if response.status_code in (401, 403):
        raise GenerationError(f"the API key in {args.api_key_env} was rejected by {url} (HTTP {response.status_code}: "
                              f"{response.text[:200].strip()}); check the key (OpenRouter: https://openrouter.ai/settings/keys)")
    if response.status_code in RETRY_STATUS:
        raise RetryableError(f"HTTP {response.status_code} from {url}: {response.text[:200].strip()}")
    if response.status_code != 200:
        raise GenerationError(f"{url} answered HTTP {response.status_code}: {response.text[:300].strip()} "
                              f"(check --model {args.model!r} and --base-url)")
    return validated_messages(response.text)


def generate_one(index, knowledge, args, api_key, stop):
    """A validated conversation, retried with back-off; RetryableError once every attempt failed."""
    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    body = request_body(build_prompt(index, knowledge, args.seed), args)
    with requests.Session() as session:
        for attempt in range(args.max_retries + 1):
            if stop.is_set():
                return None
            try:
                return request_once(session, url, headers, body, args)
            except GenerationError:
                stop.set()  # here, in the worker, so no other worker starts another request
                raise
            except RetryableError as error:
                if attempt == args.max_retries:
                    raise RetryableError(f"conversation {index}: {error} (after {attempt + 1} attempts)") from None
                time.sleep(args.retry_backoff * 2**attempt)


# -----------------------------------------------------------------------------
# Output


def count_valid_lines(path):
    """Conversations already in the output (lines CustomJSON would load)."""
    if not os.path.exists(path):
        return 0
    count = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                count += line.strip() != "" and conversation_problem(json.loads(line)) is None
            except json.JSONDecodeError:
                pass
    return count


class LineAppender:
    """Appends whole lines with one write each (O_APPEND) and fsyncs them: a crash never leaves half a conversation."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        else:
            needs_newline = False
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()
        if needs_newline:  # an earlier writer's last line lacks its newline: keep ours on lines of their own
            os.write(self.fd, b"\n")

    def append(self, messages):
        data = (json.dumps(messages, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


# -----------------------------------------------------------------------------


def main(argv=None):
    load_dotenv()  # .env in the current directory, if any; real environment variables win
    args = parse_args(argv)
    if args.num < 1 or args.workers < 1 or args.max_retries < 0:
        raise GenerationError("--num and --workers must be >= 1 and --max-retries >= 0")
    if not os.path.isfile(args.knowledge):
        raise GenerationError(f"Knowledge base file not found: {args.knowledge}. Write what the model should know about "
                              f"itself there (start from README.md, or have an LLM draft it), place it in knowledge/ "
                              f"(default {DEFAULT_KNOWLEDGE}) or pass --knowledge PATH")
    api_key = os.environ.get(args.api_key_env, "").strip()
    if not api_key:
        raise GenerationError(f"{args.api_key_env} is not set: export it or put {args.api_key_env}=... in .env "
                              f"(an OpenRouter key from https://openrouter.ai/settings/keys, or use --api-key-env for another endpoint)")
    with open(args.knowledge, encoding="utf-8") as f:
        knowledge = f.read()
    output = args.output or os.path.join(get_base_dir(), "identity_conversations.jsonl")

    existing = count_valid_lines(output)
    indices = list(range(existing, args.num))
    if not indices:
        print(f"{output} already holds {existing} conversations (--num {args.num}); nothing to do")
        return
    print(f"Generating {len(indices)} conversations with {args.model} at {args.base_url} ({args.workers} workers) into {output}"
          + (f"; {existing} already there" if existing else ""))

    appender = LineAppender(output)
    stop = threading.Event()
    written, failures, fatal = 0, [], None
    start = time.time()
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = {pool.submit(generate_one, i, knowledge, args, api_key, stop): i for i in indices}
            for future in as_completed(futures):
                try:
                    messages = future.result()
                except GenerationError as error:  # generate_one has told the other workers to stop
                    fatal = fatal or error
                    continue
                except RetryableError as error:
                    failures.append(str(error))
                    print(f"Failed: {error}")
                    continue
                if messages is not None:
                    appender.append(messages)
                    written += 1
                    elapsed = time.time() - start
                    print(f"\r{written}/{len(indices)} conversations | {written / elapsed:.2f}/s", end="", flush=True)
    finally:
        appender.close()
    print()
    kept = f"{written} new conversation(s) appended to {output} (now {existing + written})"
    if fatal is not None:
        raise GenerationError(f"{fatal}; {kept}")
    if failures:
        raise GenerationError(f"{len(failures)} of {len(indices)} conversations failed after retries (last: {failures[-1]}); "
                              f"{kept}: run again to generate the rest")
    print(f"Done: {kept}")


if __name__ == "__main__":
    run_script(main, "gen_synthetic_data")

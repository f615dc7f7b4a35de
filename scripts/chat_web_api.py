"""
The two HTTP APIs of scripts/chat_web.py, as plain data: request validation, prompt rendering and
the shapes of responses and stream events. No server, no model: chat_web.py runs the generation
and calls in here for everything a client sees.

- upstream nanochat:  POST /chat/completions, streaming only,
    events  data: {"token": "<text>", "gpu": <id>}  ...  data: {"done": true}
    errors  HTTP 400 {"detail": "<what is wrong>"}
- OpenAI-compatible:  POST /v1/chat/completions (stream false or true), GET /v1/models,
    objects chat.completion / chat.completion.chunk, usage, data: [DONE],
    errors  {"error": {"message", "type", "param", "code"}}

Both endpoints share the abuse limits below (upstream's numbers).
"""

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field

# Abuse limits, as upstream nanochat: a request is rejected (400) past these.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200  # 0 = no top-k
MAX_NEW_TOKENS = 4096
MAX_REQUEST_BYTES = 1 << 20  # 32000 characters fit many times over, even \u-escaped
MAX_CHOICES = 8  # OpenAI's n: samples per request, decoded in one batch
MAX_STOP_STRINGS = 4  # as OpenAI
SEED_MODULUS = 2 ** 63  # any integer seed is accepted and reduced to what torch.Generator takes


class RequestError(Exception):
    """A request the client must fix. status 400 unless told; param names the offending field (OpenAI shape)."""

    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


# -----------------------------------------------------------------------------
# Reading a request body


def parse_json_body(raw):
    """bytes -> the JSON object they hold; RequestError for an empty body, invalid UTF-8, bad JSON or a non-object."""
    if not raw.strip():
        raise RequestError("request body is empty: send a JSON object with a 'messages' list")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"request body is not valid UTF-8 (byte {error.start}): send UTF-8 encoded JSON")
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise RequestError(f"request body is not valid JSON: {error}")
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def optional_number(body, name, low, high):
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise RequestError(f"{name} must be a number between {low} and {high}, got {value!r}", param=name)
    return float(value)


def optional_int(body, name, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    in_range = isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low) \
        and (high is None or value <= high)
    if not in_range:
        bounds = f" between {low} and {high}" if high is not None else f" >= {low}" if low is not None else ""
        raise RequestError(f"{name} must be an integer{bounds}, got {value!r}", param=name)
    return value


def _check_text(text, where, param="messages"):
    """Length and encodability of one message's text (a lone surrogate from a \\ud800 escape cannot be tokenized)."""
    if not text:
        raise RequestError(f"{where} has empty content", param=param)
    if len(text) > MAX_MESSAGE_CHARS:
        raise RequestError(f"{where} is too long: {len(text)} characters, at most {MAX_MESSAGE_CHARS} per message", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where} contains a lone surrogate (an unpaired \\ud800-\\udfff escape)", param=param)


def _check_message_list(messages):
    if not isinstance(messages, list):
        raise RequestError("messages must be a list of {\"role\", \"content\"} objects", param="messages")
    if not messages:
        raise RequestError("at least one message is required", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)}, at most {MAX_MESSAGES} per request", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"message {i} must be an object with 'role' and 'content'", param="messages")


def _check_total(texts):
    total = sum(len(text) for text in texts)
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"conversation is too long: {total} characters, at most {MAX_TOTAL_CHARS} in total", param="messages")


# -----------------------------------------------------------------------------
# Upstream nanochat: POST /chat/completions


@dataclass
class UpstreamRequest:
    messages: list  # [{"role": "user"|"assistant", "content": str}]
    temperature: float | None  # None: the server's default
    top_k: int | None  # None: the server's default; 0: no top-k
    max_tokens: int | None  # None: the server's default


def parse_upstream_request(body):
    messages = body.get("messages")
    _check_message_list(messages)
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise RequestError(f"message {i} has invalid role {role!r}: must be 'user' or 'assistant'")
        if not isinstance(content, str):
            raise RequestError(f"message {i} content must be a string, got {type(content).__name__}")
        _check_text(content, f"message {i}")
    _check_total(message["content"] for message in messages)
    return UpstreamRequest(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        temperature=optional_number(body, "temperature", 0.0, MAX_TEMPERATURE),
        top_k=optional_int(body, "top_k", 0, MAX_TOP_K),
        max_tokens=optional_int(body, "max_tokens", 1, MAX_NEW_TOKENS),
    )


def upstream_prompt(tokenizer, messages):
    """<|bos|>, each turn in its start/end tokens (in the order given), then <|assistant_start|>."""
    special = tokenizer.encode_special
    ids = [tokenizer.get_bos_token_id()]
    for message in messages:
        if message["role"] == "user":
            ids += [special("<|user_start|>"), *tokenizer.encode(message["content"]), special("<|user_end|>")]
        else:
            ids += [special("<|assistant_start|>"), *tokenizer.encode(message["content"]), special("<|assistant_end|>")]
    return ids + [special("<|assistant_start|>")]


def sse(payload):
    """One Server-Sent-Events message; non-ASCII stays readable."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -----------------------------------------------------------------------------
# OpenAI-compatible: POST /v1/chat/completions


@dataclass
class OpenAIRequest:
    messages: list  # [{"role": "system"|"user"|"assistant", "content": str}]
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int  # before the cap by the model's context
    n: int
    seed: int
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _openai_content(content, i):
    """A message's content: a string, or a list of {"type": "text", "text"} parts joined by newlines."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"message {i} content part {j}: only text parts are supported, got {kind!r}", param="messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"message {i} content must be a string or a list of text parts, got {type(content).__name__}",
                           param="messages")
    _check_text(content, f"message {i}")
    return content


def _stop_strings(value):
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty strings, got {value!r}",
                           param="stop")
    return stops


def parse_openai_request(body, default_temperature, default_top_k, default_max_tokens, random_seed):
    """Validate a chat.completions request; unknown fields (model, user, ...) are ignored."""
    messages = body.get("messages")
    _check_message_list(messages)
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"message {i} has unsupported role {role!r}: use 'system', 'user' or 'assistant'", param="messages")
        checked.append({"role": role, "content": _openai_content(message.get("content"), i)})
    _check_total(message["content"] for message in checked)
    if checked[-1]["role"] != "user":
        raise RequestError("the last message must be the user's: the model answers it", param="messages")

    temperature = optional_number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = optional_number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:  # the nucleus shrinks to the single most likely token
        temperature, top_p = 0.0, None
    top_k = optional_int(body, "top_k", 0, MAX_TOP_K)  # not OpenAI's, but what the upstream UI sends
    max_tokens = optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
        raise RequestError("stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    seed = optional_int(body, "seed")
    return OpenAIRequest(
        messages=checked,
        temperature=default_temperature if temperature is None else temperature,
        top_k=default_top_k if top_k is None else top_k,
        top_p=top_p,
        max_tokens=min(max_tokens or default_max_tokens, MAX_NEW_TOKENS),
        n=optional_int(body, "n", 1, MAX_CHOICES) or 1,
        seed=(random_seed if seed is None else seed) % SEED_MODULUS,
        stop=_stop_strings(body.get("stop")),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def openai_prompt(tokenizer, messages):
    """The conversation as training renders it (a system message heads the first user turn), then <|assistant_start|>."""
    try:
        ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=sys.maxsize)
    except ValueError as error:
        raise RequestError(str(error), param="messages")
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def error_body(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StopScanner:
    """
    Cuts one choice's text at the first stop string. Text that could be the start of a stop string
    is held back until the next piece decides it, so a stop string split across pieces is still found.
    """

    def __init__(self, stops):
        self.stops = stops
        self.held = ""

    def feed(self, text):
        """-> (text safe to emit, whether a stop string was reached)."""
        buffer = self.held + text
        hits = [buffer.find(stop) for stop in self.stops if stop in buffer]
        if hits:
            self.held = ""
            return buffer[:min(hits)], True
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if buffer.endswith(stop[:k])), default=0)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class CompletionBuilder:
    """
    Turns generation pieces (per choice: new text, tokens it took, finish) into OpenAI objects:
    chunks while streaming, or one chat.completion at the end. Both go through add(), so the
    streamed text always joins to the non-streamed one.
    """

    def __init__(self, model_id, request, prompt_tokens):
        self.model_id, self.request, self.prompt_tokens = model_id, request, prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.scanners = [StopScanner(request.stop) for _ in range(request.n)]
        self.texts = [""] * request.n
        self.finish_reasons = [None] * request.n
        self.completion_tokens = 0

    @property
    def done(self):
        return all(reason is not None for reason in self.finish_reasons)

    def add(self, piece):
        """One piece -> (text to emit, finish_reason or None); pieces of a finished choice are ignored."""
        i = piece.index
        if self.finish_reasons[i] is not None:
            return "", None
        self.completion_tokens += piece.tokens
        text, stopped = self.scanners[i].feed(piece.text)
        finish = "stop" if stopped else piece.finish
        if finish is not None and not stopped:
            text += self.scanners[i].flush()
        self.texts[i] += text
        self.finish_reasons[i] = finish
        return text, finish

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _chunk(self, choices, **extra):
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                 "choices": choices, **extra}
        if self.request.include_usage and "usage" not in extra:
            chunk["usage"] = None
        return chunk

    def first_chunks(self):
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                for i in range(self.request.n)]

    def chunks_for(self, piece):
        text, finish = self.add(piece)
        chunks = []
        if text:
            chunks.append(self._chunk([{"index": piece.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]))
        if finish is not None:
            chunks.append(self._chunk([{"index": piece.index, "delta": {}, "logprobs": None, "finish_reason": finish}]))
        return chunks

    def last_chunks(self):
        return [self._chunk([], usage=self.usage())] if self.request.include_usage else []

    def completion(self):
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(self.texts, self.finish_reasons))]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": choices, "usage": self.usage()}


def models_list(model_id, created):
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}]}

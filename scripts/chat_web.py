"""
Chat with a nanochat model in the browser, or from any OpenAI client: one FastAPI app on uvicorn
that serves the UI, upstream nanochat's streaming API and an OpenAI-compatible API.

One model replica per GPU (cuda:0 .. cuda:N-1), each a worker with one decode loop on its own
thread that batches every running request into each forward pass (continuous batching, up to
--max-batch rows); a request joins once its prompt is prefilled and leaves at once when done or
when its client goes. Past the free rows, requests wait (at most --max-queue of them, for at most
--max-wait seconds; otherwise 503 with Retry-After).

Run it:
    python -m scripts.chat_web                          # the SFT model on one GPU, http://<host>:8000
    python -m scripts.chat_web --num-gpus 8 --max-batch 64   # 8 replicas, 64 replies at once on each
    python -m scripts.chat_web -i base -g d20 -s 21400 --device-type cpu --host 127.0.0.1  # CPU, localhost only
    python -m scripts.chat_web -d float32               # the compute dtype (as NANOCHAT_DTYPE sets it)

Endpoints:
    GET  /                     the chat UI (nanochat/ui.html)
    GET  /logo.svg             its logo
    POST /chat/completions     upstream API, Server-Sent Events: data: {"token", "gpu"} ... data: {"done": true}
    POST /v1/chat/completions  OpenAI chat completions, stream false or true (usage, n, seed, stop, top_p)
    GET  /v1/models            the loaded model, e.g. nanochat-sft-d20-650
    GET  /health               {"status", "ready", "num_gpus", "available_workers"}
    GET  /stats                requests running and waiting, batch rows, tokens/s, longest first-token wait

Reads $NANOCHAT_BASE_DIR/<source>_checkpoints/<tag>/ and the tokenizer; writes nothing.
"""

import sys

from nanochat.precision import add_dtype_flag, apply_dtype_flag, check_dtype_flag

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import argparse
import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.batch_engine import DEFAULT_PREFILL_CHUNK, BatchEngine, GenerationRequest
from nanochat.checkpoint_manager import PHASES, load_model, locate_checkpoint
from nanochat.common import ConfigError, autodetect_device_type, compute_init, parse_flags, run_script
from nanochat.flash_attention import require_fast_attention
from nanochat.tokenizer import IncrementalDecoder
from scripts import chat_web_api as api

logger = logging.getLogger("chat_web")

PACKAGE_DIR = Path(nanochat.__file__).parent
UI_HTML_PATH = PACKAGE_DIR / "ui.html"
LOGO_PATH = PACKAGE_DIR / "logo.svg"
RETRY_AFTER_SECONDS = 2  # a reply of a few hundred tokens takes about this long on one GPU
API_URL_LINE = "const API_URL = '';"  # the page then calls the server it came from
# Sampling defaults, as upstream's flags: a request that leaves a field out gets these.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_QUEUE = 64  # a few minutes of replies on one GPU; past it a client is better told to come back
DEFAULT_MAX_BATCH = 32  # rows decoded together per worker: a GPU steps 32 rows in about the time of one
DEFAULT_MAX_WAIT = 30.0  # seconds a request may wait for a free row before it gets 503


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat web server (UI + upstream API + OpenAI API)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only; CPU/MPS run one)")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=list(PHASES), help="checkpoints to load")
    parser.add_argument("-t", "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=DEFAULT_TOP_K, help="default top-k (0 = none)")
    parser.add_argument("-m", "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default tokens per reply")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag (None: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (None: the last one)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    add_dtype_flag(parser)
    parser.add_argument("--host", type=str, default="0.0.0.0",
                        help="address to bind (0.0.0.0: every interface; 127.0.0.1: this machine only)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a free row; the next one gets 503")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="rows (replies) each worker decodes together; an n-sample request takes n")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="positions each worker's KV cache holds in all, rows x the longest conversation in flight; "
                             "past it requests wait (None: max-batch x the model's sequence_len)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="tokens one conversation may hold, prompt and reply (None: as far as the model's rotary "
                             "tables reach, 10 x sequence_len, within --kv-cache-tokens)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="prompt tokens prefilled between two decode steps, so long prompts do not stall other replies")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT,
                        help="seconds a request may wait for a free row; then it gets 503 with Retry-After")
    return parse_flags(parser, argv)


# -----------------------------------------------------------------------------
# Workers: one model replica each, and its batch engine on its own thread


@dataclass
class Worker:
    """One model replica on one device; its batch engine's decode loop runs on its own thread."""
    gpu_id: int
    device: torch.device
    batcher: BatchEngine

    def start(self, loop):
        """
        Run the decode loop. Its events reach the request handlers through one event-loop callback
        per step, or fewer: while one is pending, later steps' events join it (each wake-up of the
        loop thread costs the decode thread a system call and, on a busy machine, its core).
        """
        pending, lock = [], threading.Lock()

        def deliver():
            with lock:
                events = pending[:]
                pending.clear()
            _dispatch(events)

        def publish(events):
            with lock:
                wake = not pending
                pending.extend(events)
            if wake:
                with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                    loop.call_soon_threadsafe(deliver)
        self.batcher.publish = publish

        def run():
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                self.batcher.run()
        threading.Thread(target=run, name=f"chat_web-gpu{self.gpu_id}", daemon=True).start()

    def has_room(self):
        return self.batcher.queued() == 0 and self.batcher.load() < self.batcher.max_batch


def _dispatch(events):
    for job, kind, value in events:
        job.sink(kind, value)


@dataclass
class Settings:
    """What every request falls back on, and what the server reports about itself."""
    model_id: str
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_wait: float = DEFAULT_MAX_WAIT


def make_worker(gpu_id, device, model, tokenizer, max_batch=DEFAULT_MAX_BATCH, kv_cache_tokens=None, max_context=None,
                prefill_chunk=DEFAULT_PREFILL_CHUNK):
    return Worker(gpu_id, device, BatchEngine(model, tokenizer, max_batch, kv_cache_tokens, max_context, prefill_chunk))


def load_workers(args):
    """One replica per GPU (CPU/MPS: exactly one). Returns (workers, model_id)."""
    device_type = args.device_type or autodetect_device_type()
    attention = require_fast_attention(device_type)
    logger.info(f"Attention: {attention.backend} ({attention.reason})")
    if args.num_gpus < 1:
        raise ConfigError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if device_type != "cuda" and args.num_gpus > 1:
        raise ConfigError(f"--num-gpus {args.num_gpus} needs CUDA; on {device_type} the server runs exactly one worker: drop --num-gpus")
    compute_init(device_type)
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise ConfigError(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)] if device_type == "cuda" else [torch.device(device_type)]
    checkpoint_dir, step = locate_checkpoint(args.source, args.model_tag, args.step)  # every worker loads the same one
    model_tag = os.path.basename(checkpoint_dir)
    workers = []
    for gpu_id, device in enumerate(devices):
        logger.info(f"Loading the model on {device} ...")
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
        if args.max_context is not None and not 1 <= args.max_context <= model.rotary_seq_len:
            raise ConfigError(f"--max-context must be in [1, {model.rotary_seq_len}] for this model "
                              f"(its rotary tables), got {args.max_context}")
        worker = make_worker(gpu_id, device, model, tokenizer, args.max_batch, args.kv_cache_tokens, args.max_context,
                             args.prefill_chunk)
        batcher = worker.batcher
        cache_gib = batcher.kv_cache_tokens * batcher.cache.bytes_per_position() / 2 ** 30
        logger.info(f"KV cache on {device}: up to {batcher.max_batch} rows, {batcher.kv_cache_tokens} positions "
                    f"({cache_gib:.2f} GiB), {batcher.max_context} per conversation")
        workers.append(worker)
    return workers, f"nanochat-{args.source}-{model_tag}-{step}"


class PoolFull(Exception):
    pass


class WorkerPool:
    """The workers and the queue limit. A request goes to the least busy worker. Lives on the server's event loop."""

    def __init__(self, workers, max_queue):
        self.workers, self.max_queue = workers, max_queue
        self.generations = set()  # running ones, cancelled at shutdown
        for worker in workers:
            worker.start(asyncio.get_running_loop())

    def queued(self):
        return sum(worker.batcher.queued() for worker in self.workers)

    def pick(self):
        """The worker with the fewest rows in use or asked for; PoolFull when the queue is at its limit."""
        worker = min(self.workers, key=lambda w: w.batcher.load() / w.batcher.max_batch)
        if not worker.has_room() and self.queued() >= self.max_queue:
            raise PoolFull(f"all {sum(w.batcher.max_batch for w in self.workers)} rows are busy and {self.queued()} "
                           "requests are waiting; retry shortly")
        return worker

    def close(self):
        for generation in list(self.generations):
            generation.cancel()
        for worker in self.workers:
            worker.batcher.close()


# -----------------------------------------------------------------------------
# Generation: a request on a worker's batch engine, as text pieces on the event loop


@dataclass
class Piece:
    index: int  # which sample
    text: str  # new text, "" while a character is incomplete
    tokens: int  # generated tokens this piece stands for (0 for the end of a sample)
    finish: str | None  # on a sample's last piece: "stop" (the model ended its turn) or "length"


class GenerationError(Exception):
    pass


class Generation:
    """
    One request, submitted to a worker's batch engine when made. `await admitted(...)` waits for
    its rows; then iterate it (async) for lists of Pieces. cancel() frees its rows before the next
    decode step; a failed step ends the iteration with GenerationError.
    """

    def __init__(self, pool, worker, request):
        self.pool, self.worker = pool, worker
        tokenizer = worker.batcher.tokenizer
        self.stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.decoders = [IncrementalDecoder(tokenizer) for _ in range(request.num_samples)]
        self.finished = [False] * request.num_samples
        self.events = asyncio.Queue()
        self.started = asyncio.Event()
        self.job = worker.batcher.submit(request, self._on_event)
        pool.generations.add(self)

    def cancel(self):
        """Free the rows (before the next decode step) and end the iteration; safe to call twice."""
        if self in self.pool.generations:
            self.worker.batcher.cancel(self.job)
            self.pool.generations.discard(self)
            self.events.put_nowait(("end", None))

    async def admitted(self, request, max_wait):
        """True once the request has rows; False (and cancelled) if the client left or max_wait passed first."""
        started = asyncio.ensure_future(self.started.wait())
        disconnect = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({started, disconnect}, timeout=max_wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            disconnect.cancel()
        if not self.started.is_set():
            self.cancel()
        return self.started.is_set()

    def _on_event(self, kind, value):
        """On the event loop: the batch engine's news about this request."""
        if kind == "admitted":
            self.started.set()
        elif kind == "tokens":
            pieces = []
            for i, token in enumerate(value[0]):
                if self.finished[i]:
                    continue
                if token in self.stop_ids:  # the stop token itself is not text
                    self.finished[i] = True
                    pieces.append(Piece(i, self.decoders[i].flush(), 0, "stop"))
                else:
                    pieces.append(Piece(i, self.decoders[i].add(token), 1, None))
            self.events.put_nowait(("pieces", pieces))
        elif kind == "done":
            last = [Piece(i, d.flush(), 0, "length") for i, d in enumerate(self.decoders) if not self.finished[i]]
            self.events.put_nowait(("pieces", last))
            self.events.put_nowait(("end", None))
            self.pool.generations.discard(self)
        elif kind == "error":
            self.started.set()
            self.events.put_nowait(("error", value))
            self.pool.generations.discard(self)

    async def __aiter__(self):
        """Lists of pieces; what arrived while the reader was busy comes as one list."""
        while True:
            items = [await self.events.get()]
            while not self.events.empty():
                items.append(self.events.get_nowait())
            pieces = [piece for kind, value in items if kind == "pieces" for piece in value]
            if pieces:
                yield pieces
            for kind, value in items:
                if kind == "error":
                    raise GenerationError(value)
                if kind == "end":
                    return


class GenerationStream(StreamingResponse):
    """An SSE response that cancels its generation when it ends, whatever ended it: done, a client gone, an error."""

    def __init__(self, generation, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def context_room(worker, prompt, num_samples=1):
    """Tokens the model can still add after the prompt (--max-context, and --kv-cache-tokens over the samples)."""
    room = worker.batcher.room(len(prompt), num_samples)
    if room < 1:
        raise api.RequestError(f"the conversation is {len(prompt)} tokens; this server holds "
                               f"{len(prompt) + room} for a request of {num_samples} sample(s) "
                               "(--max-context, --kv-cache-tokens): shorten it or start a new one",
                               param="messages", code="context_length_exceeded")
    return room


def random_seed():
    return random.randint(0, 2 ** 31 - 1)


async def read_body(request):
    """The request body, refused (413) as soon as it grows past what any valid request needs."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > api.MAX_REQUEST_BYTES:
            raise api.RequestError(f"request body is over {api.MAX_REQUEST_BYTES} bytes, more than any valid request needs",
                                   status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -----------------------------------------------------------------------------
# The app


def create_app(workers, settings):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.pool = WorkerPool(workers, settings.max_queue)
        yield
        app.state.pool.close()

    app = FastAPI(lifespan=lifespan)
    app.state.pool = None
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    tokenizer = workers[0].batcher.tokenizer
    started = int(time.time())

    def busy(message, openai):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        body = api.error_body(message, type="server_error", code="server_busy") if openai else {"detail": message}
        return JSONResponse(body, status_code=503, headers=headers)

    def openai_error(error):
        return JSONResponse(api.error_body(error.message, param=error.param, code=error.code), status_code=error.status)

    async def start_generation(request, generation_request, openai):
        """Submit to the least busy worker and wait for rows: (generation, None), or (None, the 503 to send)."""
        pool = app.state.pool
        try:
            worker = pool.pick()
        except PoolFull as error:
            return None, busy(str(error), openai)
        try:
            generation = Generation(pool, worker, generation_request)
        except ValueError as error:  # more samples than a batch holds
            if openai:
                return None, openai_error(api.RequestError(str(error), param="n"))
            return None, JSONResponse({"detail": str(error)}, status_code=400)
        if not await generation.admitted(request, settings.max_wait):
            return None, busy(f"no free row within {settings.max_wait:g} s ({pool.queued()} requests waiting); retry shortly", openai)
        return generation, None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        if request.url.path.startswith("/v1/"):
            return JSONResponse(api.error_body(str(error.detail), code=str(error.status_code)), status_code=error.status_code)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    @app.get("/")
    async def root():
        try:
            html = UI_HTML_PATH.read_text(encoding="utf-8")
        except FileNotFoundError:
            return HTMLResponse(f"chat_web: the UI page {UI_HTML_PATH} is missing; the API still works "
                                "(POST /chat/completions, /v1/chat/completions)", status_code=500)
        lines = [line[:len(line) - len(line.lstrip())] + API_URL_LINE if line.lstrip().startswith("const API_URL") else line
                 for line in html.splitlines()]
        return HTMLResponse("\n".join(lines))

    @app.get("/logo.svg")
    async def logo():
        if not LOGO_PATH.exists():
            return JSONResponse({"detail": f"the logo {LOGO_PATH} is missing"}, status_code=404)
        return Response(LOGO_PATH.read_bytes(), media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "ok", "ready": pool is not None and len(pool.workers) > 0, "num_gpus": len(pool.workers) if pool else 0,
                "available_workers": sum(worker.has_room() for worker in pool.workers) if pool else 0}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        per_worker = [{"gpu_id": w.gpu_id, "device": str(w.device), **w.batcher.stats()} for w in pool.workers]
        available = sum(worker.has_room() for worker in pool.workers)
        busy_workers = sum(1 for worker in per_worker if worker["active_requests"] > 0)
        totals = {key: sum(worker[key] for worker in per_worker)
                  for key in ("active_requests", "batch_rows", "waiting_requests", "tokens_per_s")}
        longest = {key: max(worker[key] for worker in per_worker) for key in ("oldest_wait_s", "longest_first_token_wait_s")}
        return {"total_workers": len(pool.workers), "available_workers": available, "busy_workers": busy_workers,
                **totals, **longest, "max_queue": pool.max_queue, "max_wait_s": settings.max_wait, "workers": per_worker}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            chat = api.parse_upstream_request(api.parse_json_body(await read_body(request)))
            prompt = api.upstream_prompt(tokenizer, chat.messages)
            room = context_room(workers[0], prompt)
        except api.RequestError as error:
            return JSONResponse({"detail": error.message}, status_code=error.status)
        temperature = settings.temperature if chat.temperature is None else chat.temperature
        top_k = settings.top_k if chat.top_k is None else chat.top_k
        wanted = GenerationRequest(prompt, 1, min(chat.max_tokens or settings.max_tokens, room), temperature, top_k or None,
                                   None, random_seed())
        generation, refusal = await start_generation(request, wanted, openai=False)
        if refusal is not None:
            return refusal
        worker = generation.worker
        logger.info(f"[gpu {worker.gpu_id}] {len(chat.messages)} messages, last: {chat.messages[-1]['content']!r}")

        async def events():
            reply = []
            try:
                async for pieces in generation:
                    for piece in pieces:
                        if piece.text:
                            reply.append(piece.text)
                            yield api.sse({"token": piece.text, "gpu": worker.gpu_id})
            except GenerationError as error:
                yield api.sse({"error": f"generation failed: {error}", "gpu": worker.gpu_id})
                return
            logger.info(f"[gpu {worker.gpu_id}] reply: {''.join(reply)!r}")
            yield api.sse({"done": True})

        return GenerationStream(generation, events())

    @app.get("/v1/models")
    async def models():
        return api.models_list(settings.model_id, started)

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != settings.model_id:
            return JSONResponse(api.error_body(f"model {model_id!r} is not served here; this server has {settings.model_id!r}",
                                               param="model", code="model_not_found"), status_code=404)
        return api.models_list(settings.model_id, started)["data"][0]

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        try:
            chat = api.parse_openai_request(api.parse_json_body(await read_body(request)), settings.temperature, settings.top_k,
                                            settings.max_tokens, random_seed())
            prompt = api.openai_prompt(tokenizer, chat.messages)
            max_tokens = min(chat.max_tokens, context_room(workers[0], prompt, min(chat.n, workers[0].batcher.max_batch)))
        except api.RequestError as error:
            return openai_error(error)
        wanted = GenerationRequest(prompt, chat.n, max_tokens, chat.temperature, chat.top_k or None, chat.top_p, chat.seed)
        generation, refusal = await start_generation(request, wanted, openai=True)
        if refusal is not None:
            return refusal
        worker = generation.worker
        builder = api.CompletionBuilder(settings.model_id, chat, len(prompt))

        logger.info(f"[gpu {worker.gpu_id}] /v1: {len(chat.messages)} messages, {len(prompt)} prompt tokens, n={chat.n}")

        async def collect():
            async for pieces in generation:
                if builder.done:  # ended early (a stop string): the rows are already freed
                    continue
                for piece in pieces:
                    yield builder.chunks_for(piece)
                if builder.done:  # every choice ended (stop strings may end them before the Engine does)
                    generation.cancel()
            logger.info(f"[gpu {worker.gpu_id}] /v1 reply: {builder.texts!r}, {builder.completion_tokens} tokens")

        if chat.stream:
            async def events():
                for chunk in builder.first_chunks():
                    yield api.sse(chunk)
                try:
                    async for chunks in collect():
                        for chunk in chunks:
                            yield api.sse(chunk)
                except GenerationError as error:
                    yield api.sse(api.error_body(f"generation failed: {error}", type="server_error"))
                    return
                for chunk in builder.last_chunks():
                    yield api.sse(chunk)
                yield "data: [DONE]\n\n"

            return GenerationStream(generation, events())

        async def run():
            async for _ in collect():
                pass

        completion = asyncio.ensure_future(run())
        disconnect = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({completion, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not completion.done():  # the client left: nobody reads the answer
                return Response(status_code=499)
            completion.result()
        except GenerationError as error:
            return JSONResponse(api.error_body(f"generation failed: {error}", type="server_error"), status_code=500)
        finally:
            generation.cancel()
            completion.cancel()
            disconnect.cancel()
        return builder.completion()

    return app


def main(argv=None):
    args = parse_args(argv)
    check_dtype_flag(args.dtype)
    ranges = [("--max-queue", args.max_queue, 0, float("inf")), ("--temperature", args.temperature, 0, api.MAX_TEMPERATURE),
              ("--top-k", args.top_k, 0, api.MAX_TOP_K), ("--max-tokens", args.max_tokens, 1, api.MAX_NEW_TOKENS)]
    for flag, value, low, high in ranges:
        if not low <= value <= high:
            raise ConfigError(f"{flag} must be {f'>= {low}' if high == float('inf') else f'in [{low}, {high}]'}, got {value}")
    for flag, value in [("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk),
                        ("--kv-cache-tokens", args.kv_cache_tokens or 1)]:
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not args.max_wait > 0:
        raise ConfigError(f"--max-wait must be > 0 seconds, got {args.max_wait}")
    workers, model_id = load_workers(args)
    settings = Settings(model_id, args.temperature, args.top_k, args.max_tokens, args.max_queue, args.max_wait)
    app = create_app(workers, settings)
    print(f"Serving {model_id} on {len(workers)} worker(s) at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    run_script(main, "chat_web")

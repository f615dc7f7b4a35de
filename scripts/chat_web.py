"""
Chat with a nanochat model in the browser, or from any OpenAI client: one FastAPI app on uvicorn
that serves the UI, upstream nanochat's streaming API and an OpenAI-compatible API.

Data parallel: one model replica per GPU (cuda:0 .. cuda:N-1), each a worker; a request waits
for a free worker (at most --max-queue requests wait, the next gets 503 with Retry-After), and
generation runs in that worker's own thread, so the server keeps answering while it streams.

Run it:
    python -m scripts.chat_web                          # the SFT model on one GPU, http://<host>:8000
    python -m scripts.chat_web --num-gpus 8             # 8 replicas, one per GPU
    python -m scripts.chat_web -i base -g d20 -s 21400 --device-type cpu --host 127.0.0.1  # CPU, localhost only
    NANOCHAT_DTYPE=float32 python -m scripts.chat_web   # the compute dtype comes from NANOCHAT_DTYPE

Endpoints:
    GET  /                     the chat UI (nanochat/ui.html)
    GET  /logo.svg             its logo
    POST /chat/completions     upstream API, Server-Sent Events: data: {"token", "gpu"} ... data: {"done": true}
    POST /v1/chat/completions  OpenAI chat completions, stream false or true (usage, n, seed, stop, top_p)
    GET  /v1/models            the loaded model, e.g. nanochat-sft-d20-650
    GET  /health               {"status", "ready", "num_gpus", "available_workers"}
    GET  /stats                the worker pool

Reads $NANOCHAT_BASE_DIR/<source>_checkpoints/<tag>/ and the tokenizer; writes nothing.
"""

import argparse
import asyncio
import contextlib
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.checkpoint_manager import CHECKPOINT_DIRS, checkpoints_dir_for, find_largest_model, load_model
from nanochat.common import ConfigError, autodetect_device_type, compute_init, parse_flags, run_script
from nanochat.engine import Engine
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat web server (UI + upstream API + OpenAI API)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only; CPU/MPS run one)")
    parser.add_argument("-i", "--source", type=str, default="sft", choices=list(CHECKPOINT_DIRS), help="checkpoints to load")
    parser.add_argument("-t", "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=DEFAULT_TOP_K, help="default top-k (0 = none)")
    parser.add_argument("-m", "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default tokens per reply")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag (None: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (None: the last one)")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--host", type=str, default="0.0.0.0",
                        help="address to bind (0.0.0.0: every interface; 127.0.0.1: this machine only)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a busy worker; the next one gets 503")
    return parse_flags(parser, argv)


# -----------------------------------------------------------------------------
# Workers and their pool


@dataclass
class Worker:
    """One model replica on one device, with the single thread that runs its generations."""
    gpu_id: int
    device: torch.device
    engine: Engine
    executor: ThreadPoolExecutor


@dataclass
class Settings:
    """What every request falls back on, and what the server reports about itself."""
    model_id: str
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_queue: int = DEFAULT_MAX_QUEUE


def make_worker(gpu_id, device, model, tokenizer):
    return Worker(gpu_id, device, Engine(model, tokenizer), ThreadPoolExecutor(1, thread_name_prefix=f"chat_web-gpu{gpu_id}"))


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
    model_tag = args.model_tag or find_largest_model(checkpoints_dir_for(args.source))
    workers, step = [], args.step
    for gpu_id, device in enumerate(devices):
        logger.info(f"Loading the model on {device} ...")
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
        step = meta.get("step", step)
        workers.append(make_worker(gpu_id, device, model, tokenizer))
    return workers, f"nanochat-{args.source}-{model_tag}-{step}"


class PoolFull(Exception):
    pass


class WorkerPool:
    """Idle workers in an asyncio queue; at most max_queue requests wait for one. Lives on the server's event loop."""

    def __init__(self, workers, max_queue):
        self.workers, self.max_queue = workers, max_queue
        self.loop = asyncio.get_running_loop()
        self.idle = asyncio.Queue()
        for worker in workers:
            self.idle.put_nowait(worker)
        self.waiting = 0
        self.generations = set()  # running ones, cancelled at shutdown

    async def acquire(self):
        if self.idle.empty() and self.waiting >= self.max_queue:
            raise PoolFull(f"all {len(self.workers)} workers are busy and {self.waiting} requests are waiting; retry shortly")
        self.waiting += 1
        try:
            return await self.idle.get()
        finally:
            self.waiting -= 1

    def call_from_thread(self, function, *args):
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(function, *args)


# -----------------------------------------------------------------------------
# Generation: the Engine in a worker's thread, text pieces on the event loop


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
    One Engine.generate call, run on a worker's thread from the moment it is made. Iterate it
    (async) for lists of Pieces. cancel() stops it between two tokens; the thread then hands the
    worker back to the pool, also when generation raised (iteration raises GenerationError).
    """

    def __init__(self, pool, worker, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed):
        self.pool, self.worker = pool, worker
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        kwargs = dict(num_samples=num_samples, max_tokens=max_tokens, temperature=temperature,
                      top_k=top_k or None, top_p=top_p, seed=seed)
        pool.generations.add(self)
        worker.executor.submit(self._run, prompt, kwargs)

    def cancel(self):
        self.cancelled.set()

    def _put(self, event):
        self.pool.call_from_thread(self.events.put_nowait, event)

    def _finish(self, last_event):
        """On the event loop: the worker goes back before the last event, so a client that saw the end finds it free."""
        self.pool.idle.put_nowait(self.worker)
        self.pool.generations.discard(self)
        self.events.put_nowait(last_event)

    def _run(self, prompt, kwargs):
        engine = self.worker.engine
        tokenizer = engine.tokenizer
        stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        decoders = [IncrementalDecoder(tokenizer) for _ in range(kwargs["num_samples"])]
        finished = [False] * len(decoders)
        device = self.worker.device
        last_event = ("end", None)
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for token_column, _ in engine.generate(prompt, **kwargs):
                    if self.cancelled.is_set():
                        break
                    pieces = []
                    for i, token in enumerate(token_column):
                        if finished[i]:
                            continue
                        if token in stop_ids:  # the stop token itself is not text
                            finished[i] = True
                            pieces.append(Piece(i, decoders[i].flush(), 0, "stop"))
                        else:
                            pieces.append(Piece(i, decoders[i].add(token), 1, None))
                    self._put(("pieces", pieces))
            self._put(("pieces", [Piece(i, d.flush(), 0, "length") for i, d in enumerate(decoders) if not finished[i]]))
        except Exception as error:
            logger.exception(f"generation failed on gpu {self.worker.gpu_id}")
            last_event = ("error", f"{type(error).__name__}: {error}")
        finally:
            self.pool.call_from_thread(self._finish, last_event)

    async def __aiter__(self):
        while True:
            kind, value = await self.events.get()
            if kind == "pieces":
                yield value
            elif kind == "error":
                raise GenerationError(value)
            else:
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


def context_room(worker, prompt):
    """Tokens the model can still add after the prompt: positions stop at its rotary tables (10x sequence_len)."""
    room = worker.engine.model.rotary_seq_len - len(prompt)
    if room < 1:
        raise api.RequestError(f"the conversation is {len(prompt)} tokens; the model has room for "
                               f"{worker.engine.model.rotary_seq_len} in all: shorten it or start a new one",
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
        for generation in list(app.state.pool.generations):
            generation.cancel()
        for worker in workers:
            worker.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan)
    app.state.pool = None
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    tokenizer = workers[0].engine.tokenizer
    started = int(time.time())

    def pool_full(error, openai):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        body = api.error_body(str(error), type="server_error", code="server_busy") if openai else {"detail": str(error)}
        return JSONResponse(body, status_code=503, headers=headers)

    def openai_error(error):
        return JSONResponse(api.error_body(error.message, param=error.param, code=error.code), status_code=error.status)

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
        return {"status": "ok", "ready": pool is not None and len(pool.workers) > 0,
                "num_gpus": len(pool.workers) if pool else 0, "available_workers": pool.idle.qsize() if pool else 0}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        available = pool.idle.qsize()
        return {"total_workers": len(pool.workers), "available_workers": available, "busy_workers": len(pool.workers) - available,
                "waiting_requests": pool.waiting, "max_queue": pool.max_queue,
                "workers": [{"gpu_id": w.gpu_id, "device": str(w.device)} for w in pool.workers]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            chat = api.parse_upstream_request(api.parse_json_body(await read_body(request)))
            prompt = api.upstream_prompt(tokenizer, chat.messages)
            room = context_room(workers[0], prompt)
        except api.RequestError as error:
            return JSONResponse({"detail": error.message}, status_code=error.status)
        try:
            worker = await app.state.pool.acquire()
        except PoolFull as error:
            return pool_full(error, openai=False)
        max_tokens = min(chat.max_tokens or settings.max_tokens, room)
        temperature = settings.temperature if chat.temperature is None else chat.temperature
        top_k = settings.top_k if chat.top_k is None else chat.top_k
        generation = Generation(app.state.pool, worker, prompt, 1, max_tokens, temperature, top_k, None, random_seed())
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
            max_tokens = min(chat.max_tokens, context_room(workers[0], prompt))
        except api.RequestError as error:
            return openai_error(error)
        try:
            worker = await app.state.pool.acquire()
        except PoolFull as error:
            return pool_full(error, openai=True)
        generation = Generation(app.state.pool, worker, prompt, chat.n, max_tokens, chat.temperature, chat.top_k, chat.top_p, chat.seed)
        builder = api.CompletionBuilder(settings.model_id, chat, len(prompt))

        logger.info(f"[gpu {worker.gpu_id}] /v1: {len(chat.messages)} messages, {len(prompt)} prompt tokens, n={chat.n}")

        async def collect():
            async for pieces in generation:
                if builder.done:  # ended early: the rest is drained, so the reply ends once the worker is free
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
    ranges = [("--max-queue", args.max_queue, 0, float("inf")), ("--temperature", args.temperature, 0, api.MAX_TEMPERATURE),
              ("--top-k", args.top_k, 0, api.MAX_TOP_K), ("--max-tokens", args.max_tokens, 1, api.MAX_NEW_TOKENS)]
    for flag, value, low, high in ranges:
        if not low <= value <= high:
            raise ConfigError(f"{flag} must be {f'>= {low}' if high == float('inf') else f'in [{low}, {high}]'}, got {value}")
    workers, model_id = load_workers(args)
    settings = Settings(model_id, args.temperature, args.top_k, args.max_tokens, args.max_queue)
    app = create_app(workers, settings)
    print(f"Serving {model_id} on {len(workers)} worker(s) at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    run_script(main, "chat_web")

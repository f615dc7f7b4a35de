"""
Load benchmark for chat_web: N clients stream replies from one server at once, each sending its
next request as soon as the last one ends. Per N it prints the aggregate tokens/s, the time to
first token (TTFT, p50/p95) and the inter-token latency (p50/p95) the clients saw.

    python dev/bench_chat_web.py                                 # a random-init d4 model in a temp dir; N = 1, 8, 32
    python dev/bench_chat_web.py --compare upstream=/tmp/upstream --compare before=/tmp/old   # other checkouts, side by side
    python dev/bench_chat_web.py --url http://127.0.0.1:8000     # a server that is already running
    python dev/bench_chat_web.py --base-dir ~/.cache/nanochat --source sft --model-tag d20 --seconds 60

Servers are started one at a time, on 127.0.0.1, and never overlap; --rounds > 1 alternates them,
so that a shared machine's ups and downs fall on both alike. Clients use upstream's streaming API
(POST /chat/completions), which both servers speak; a token is one streamed text event.
Writes a tokenizer and a d4 checkpoint into --base-dir when it has none (random weights: the
speed is the same and every reply runs to --max-tokens). The last stdout line is one JSON document.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

BENCH_MODEL_TAG = "bench_d4"
# dev/runcpu.sh's model: depth 4, 64-wide heads, full attention, 256-token context, an 8K vocab.
BENCH_DEPTH, BENCH_HEAD_DIM, BENCH_SEQ_LEN, BENCH_VOCAB_SIZE = 4, 64, 256, 8192
TOKENIZER_TEXT_BYTES = 8 << 20  # Python sources are plenty for 8K merges, and train in seconds
QUESTIONS = ["Tell me a story about a cat.", "Why is the sky blue?", "Write a short poem about rain.",
             "What is the capital of France?", "Explain photosynthesis to a child.", "Give me three names for a dog."]


# -----------------------------------------------------------------------------
# The benchmark checkpoint


def python_sources(limit_bytes):
    """Texts of the standard library's .py files, up to limit_bytes in all."""
    total = 0
    for root, _, files in sorted(os.walk(sysconfig.get_paths()["stdlib"])):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                yield text
                total += len(text)
                if total >= limit_bytes:
                    return


def make_checkpoint(base_dir):
    """A tokenizer (8K vocab) and a random-init d4 base model under base_dir, unless they are there."""
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", BENCH_MODEL_TAG)
    if os.path.exists(os.path.join(checkpoint_dir, "meta_000000.json")):
        return
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    from dataclasses import asdict

    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer

    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
        print(f"Training an {BENCH_VOCAB_SIZE}-token tokenizer on Python sources ...", flush=True)
        tokenizer = RustBPETokenizer.train_from_iterator(python_sources(TOKENIZER_TEXT_BYTES), BENCH_VOCAB_SIZE)
        os.makedirs(tokenizer_dir, exist_ok=True)
        tokenizer.save(tokenizer_dir)
    vocab_size = RustBPETokenizer.from_directory(tokenizer_dir).get_vocab_size()
    width = BENCH_DEPTH * 64  # base_train's aspect ratio 64
    config = GPTConfig(sequence_len=BENCH_SEQ_LEN, vocab_size=vocab_size, n_layer=BENCH_DEPTH, n_head=width // BENCH_HEAD_DIM,
                       n_kv_head=width // BENCH_HEAD_DIM, n_embd=width, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), None, {"step": 0, "model_config": asdict(config)})


# -----------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    command: list = field(default_factory=list)  # empty: already running at url
    cwd: str = REPO_ROOT
    env: dict = field(default_factory=dict)
    url: str = ""
    process: subprocess.Popen = None

    def start(self, log_path):
        if not self.command:
            return
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; its log: {log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if json.load(reply).get("ready"):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in 300 s; its log: {log_path}")

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def chat_web_server(name, cwd, args, port, extra_env=None):
    command = [sys.executable, "-m", "scripts.chat_web", "-i", args.source, "-g", args.model_tag, "--device-type",
               args.device_type, "--host", "127.0.0.1", "--port", str(port), *args.server_args.split()]
    env = {"NANOCHAT_BASE_DIR": args.base_dir, "PYTHONPATH": cwd, **(extra_env or {})}
    return Server(name, command, cwd, env, f"http://127.0.0.1:{port}")


# -----------------------------------------------------------------------------
# Clients: asyncio, HTTP/1.1 by hand (a light client leaves the cores to the server)


@dataclass
class Record:
    sent: float
    first: float = None
    token_times: list = field(default_factory=list)


async def read_chunked(reader):
    """Yield the body chunks of a chunked HTTP response."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def one_request(host, port, body, record, deadline):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"server answered {status.decode().strip()}")
        headers = (await reader.readuntil(b"\r\n\r\n")).lower()
        if b"transfer-encoding: chunked" not in headers:
            raise RuntimeError("expected a chunked event stream")
        pending = b""
        async for chunk in read_chunked(reader):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if "token" in event:
                    if record.first is None:
                        record.first = now
                    record.token_times.append(now)
                elif "error" in event:
                    raise RuntimeError(f"server error: {event['error']}")
            if time.perf_counter() > deadline:
                return
    finally:
        writer.close()


async def client(index, host, port, args, deadline, records):
    turn = 0
    while time.perf_counter() < deadline:
        question = QUESTIONS[(index + turn) % len(QUESTIONS)]
        body = {"messages": [{"role": "user", "content": f"{question} (client {index}, turn {turn})"}],
                "temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
        record = Record(time.perf_counter())
        records.append(record)
        remaining = deadline - time.perf_counter()
        try:
            await asyncio.wait_for(one_request(host, port, body, record, deadline), timeout=max(remaining, 0.01))
        except asyncio.TimeoutError:
            return
        turn += 1


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid):
    """User + system CPU time of a process so far (all its threads), from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def measure(url, clients, args, pid=None):
    host, port = url.split("//")[1].split(":")
    port = int(port)
    warm = Record(time.perf_counter())  # the first request pays for lazy setup (allocations, kernel choice)
    await one_request(host, port, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 8}, warm, float("inf"))
    records = []
    cpu_start = cpu_seconds(pid) if pid else None
    start = time.perf_counter()
    deadline = start + args.seconds
    await asyncio.gather(*(client(i, host, port, args, deadline, records) for i in range(clients)))
    cpu = cpu_seconds(pid) - cpu_start if cpu_start is not None else float("nan")
    tokens = sum(1 for r in records for t in r.token_times if t <= deadline)
    ttft = [r.first - r.sent for r in records if r.first is not None and r.first <= deadline]
    gaps = [b - a for r in records for a, b in zip(r.token_times, r.token_times[1:]) if b <= deadline]
    return {"clients": clients, "tokens_per_s": tokens / args.seconds, "requests": len(ttft),
            "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "ttft_p95_ms": 1000 * percentile(ttft, 0.95),
            "itl_p50_ms": 1000 * percentile(gaps, 0.5), "itl_p95_ms": 1000 * percentile(gaps, 0.95),
            "server_cpu_ms_per_token": 1000 * cpu / max(tokens, 1)}


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="chat_web under N concurrent streaming clients: tokens/s, TTFT, inter-token latency",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=str, default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per (server, N)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, alternating the servers; the median is reported")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--temperature", type=float, default=0.8, help="temperature of every request")
    parser.add_argument("--top-k", type=int, default=50, help="top_k of every request")
    parser.add_argument("--base-dir", type=str, default=None,
                        help="NANOCHAT_BASE_DIR of the model (None: a new temp dir, with a random d4 made in it)")
    parser.add_argument("--source", type=str, default="base", help="chat_web -i")
    parser.add_argument("--model-tag", type=str, default=BENCH_MODEL_TAG, help="chat_web -g")
    parser.add_argument("--device-type", type=str, default="cpu", help="chat_web --device-type")
    parser.add_argument("--server-args", type=str, default="", help="extra flags for our chat_web (e.g. '--max-batch 16')")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                        help="also benchmark the chat_web of another checkout (upstream's, or ours before a change), "
                             "started with the common flags only; repeatable")
    parser.add_argument("--url", type=str, default=None, help="benchmark only this running server (http://host:port)")
    parser.add_argument("--port", type=int, default=8765, help="port for the servers this script starts")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    clients = [int(n) for n in args.clients.split(",")]
    if args.url:
        servers = [Server("server", url=args.url.rstrip("/"))]
    else:
        if args.base_dir is None:
            args.base_dir = tempfile.mkdtemp(prefix="bench_chat_web_")
        args.base_dir = os.path.abspath(os.path.expanduser(args.base_dir))
        if args.model_tag == BENCH_MODEL_TAG:
            make_checkpoint(args.base_dir)
        servers = [chat_web_server("ours", REPO_ROOT, args, args.port)]
        common_flags_only = argparse.Namespace(**{**vars(args), "server_args": ""})
        for i, spec in enumerate(args.compare):
            name, _, directory = spec.partition("=")
            if not directory or not os.path.isdir(directory):
                raise SystemExit(f"--compare wants NAME=DIR with DIR a checkout holding scripts/chat_web.py, got {spec!r}")
            servers.append(chat_web_server(name, os.path.abspath(directory), common_flags_only, args.port + 1 + i))
    results = {server.name: {n: [] for n in clients} for server in servers}
    log_dir = tempfile.mkdtemp(prefix="bench_chat_web_logs_")
    for round_index in range(args.rounds):
        for server in servers:
            server.start(os.path.join(log_dir, f"{server.name}_{round_index}.log"))
            try:
                for n in clients:
                    result = asyncio.run(measure(server.url, n, args, server.process.pid if server.process else None))
                    results[server.name][n].append(result)
                    print(f"round {round_index + 1} {server.name:8s} N={n:3d}  {result['tokens_per_s']:8.1f} tok/s  "
                          f"TTFT p50 {result['ttft_p50_ms']:7.1f} ms p95 {result['ttft_p95_ms']:7.1f} ms  "
                          f"ITL p50 {result['itl_p50_ms']:6.1f} ms p95 {result['itl_p95_ms']:6.1f} ms  "
                          f"server CPU {result['server_cpu_ms_per_token']:5.2f} ms/token ({result['requests']} replies)", flush=True)
            finally:
                server.stop()

    summary = {name: {n: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for n, runs in by_n.items()}
               for name, by_n in results.items()}
    print()
    print("| server | N | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | server CPU ms/token |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_n in summary.items():
        for n, r in by_n.items():
            print(f"| {name} | {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
                  f"{r['itl_p50_ms']:.1f} | {r['itl_p95_ms']:.1f} | {r['server_cpu_ms_per_token']:.2f} |")
    print(json.dumps({"args": vars(args), "results": summary}))


if __name__ == "__main__":
    main()

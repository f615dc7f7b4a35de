"""
Test-wide setup and the shared tiny artefacts.

The environment lines run before any test module imports nanochat, so every test works in a
throwaway artifact directory and nothing touches ~/.cache/nanochat or the network.

Shared builders (session-scoped where they cost seconds, so each is made once per run):
    free_port()                 a TCP port on 127.0.0.1 nobody listens on (for gloo / servers)
    synthetic_documents(n, s)   English-like documents from a tiny grammar: learnable, varied lengths
    child_env(base)             the environment for a script subprocess working in `base`
    kill_once_saved(cmd, env, meta)  a script subprocess SIGKILLed mid-run, right after a save
    run_in_process(main, name, base, flags, monkeypatch, capsys)  a script's main as `python -m` runs it
    fake_nvidia_smi(dir, ...)   an nvidia-smi in dir that lists GPUs (for PATH), like an old driver's
    LocalHTTPServer(handler)    a real HTTP server on 127.0.0.1 for the download and client tests
    QuietHandler                its request handler base, without the per-request log lines
    build_gpt(config, seed, perturb)  a real GPT on CPU, initialized, optionally with noisy weights
    tiny_tokenizer              a real rustbpe-trained RustBPETokenizer (vocab 300), in memory
    tiny_base_dir               a NANOCHAT_BASE_DIR with 3 train shards, the val shard and a
                                tokenizer trained by scripts.tok_train (vocab 512)
    tiny_checkpoint             tiny_base_dir plus a 3-step d2 base model under the tag for_loss
"""

import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

if "NANOCHAT_TEST_KEEP_BASE_DIR" not in os.environ:
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_test_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("NANOCHAT_COMPILE", "0")  # a cold torch.compile costs ~25 s on 2 cores; test_compile turns it on

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VOCAB_SIZE = 300  # tiny_tokenizer: 256 bytes + 35 merges + 9 special tokens (a d2 model pads it to 320)
BASE_DIR_VOCAB_SIZE = 512  # tiny_base_dir's tokenizer, trained by tok_train


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LocalHTTPServer:
    """
    A threading HTTP server on 127.0.0.1 (a free port) that serves `handler` from a daemon thread:
    start() / close(), or a with block. `address` is http://127.0.0.1:<port>.
    """

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.address = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def synthetic_documents(num_docs, seed):
    """English-like documents from a tiny grammar: learnable structure, varied lengths."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my teacher", "the old king", "a small bird", "the river", "our city"]
    verbs = ["sees", "loves", "follows", "builds", "remembers", "crosses", "paints"]
    objects = ["the moon", "a red house", "the quiet sea", "many stars", "a long road", "the garden"]
    docs = []
    for _ in range(num_docs):
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(2, 30))]
        docs.append(" ".join(sentences).capitalize())
    return docs


def child_env(base):
    """Environment for a script subprocess that works in the base dir `base`, as one process."""
    env = dict(os.environ)
    env.update(NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", NANOCHAT_DTYPE="float32", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def kill_once_saved(cmd, env, meta_path):
    """
    Run the script command `cmd` and SIGKILL it at its first output line after `meta_path` exists
    (a checkpoint's meta file is written last, so that save is whole), as a crash or a lost node
    leaves a run: mid-way, no cleanup. Returns the output it printed; fails if it ended on its own.
    """
    process = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, env=dict(env, PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if os.path.exists(meta_path):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(seen)
    assert process.returncode == -signal.SIGKILL, f"the run ended (exit {process.returncode}) before it was killed:\n{output}"
    return output


def run_in_process(script_main, name, base, flags, monkeypatch, capsys):
    """
    A script's main as `python -m` runs it (through run_script), in this process: for runs that
    must fail at start, where a fresh interpreter would cost more than the check. Returns
    (exit code, stdout, stderr); any exception but SystemExit propagates (a traceback).
    """
    from nanochat.common import run_script

    for key, value in child_env(base).items():
        if key.startswith(("NANOCHAT_", "OMP_", "WANDB_")):
            monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    code = 0
    try:
        run_script(lambda: script_main(list(flags)), name)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAKE_NVIDIA_SMI = """#!/bin/sh
# answers like nvidia-smi on a node with {count} x {name}, driver {driver} (CUDA {cuda})
case "$*" in
    *compute_cap*) {caps} ;;
    *--query-gpu=*) i=0; while [ $i -lt {count} ]; do echo "{name}, {memory}, {driver}"; i=$((i+1)); done ;;
    "") echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |" ;;
    *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"""


def fake_nvidia_smi(directory, count=8, name="NVIDIA H100 80GB HBM3", memory=81559, driver="535.104.05", cuda="12.2",
                    capability="9.0"):
    """Write an executable nvidia-smi into directory; capability=None answers like a pre-R510 driver (no compute_cap)."""
    caps = (f'i=0; while [ $i -lt {count} ]; do echo "{capability}"; i=$((i+1)); done' if capability
            else 'echo "Field \\"compute_cap\\" is not a valid field to query." >&2; exit 2')
    path = os.path.join(str(directory), "nvidia-smi")
    with open(path, "w") as f:
        f.write(FAKE_NVIDIA_SMI.format(count=count, name=name, memory=memory, driver=driver, cuda=cuda, caps=caps))
    os.chmod(path, 0o755)
    return path


def build_gpt(config, seed=0, perturb=0.0):
    """
    A GPT on CPU, built on the meta device and initialized as training does, in eval mode.
    perturb > 0 adds that much noise to every weight, so the zero-initialized output
    projections, gates and scalars stop hiding paths (round trips then test every tensor).
    """
    import torch

    from nanochat.gpt import GPT

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer

    tokenizer = RustBPETokenizer.train_from_iterator(synthetic_documents(400, seed=7), TINY_VOCAB_SIZE)
    assert tokenizer.get_vocab_size() == TINY_VOCAB_SIZE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """3 train shards (row groups of 64 docs), the pinned val shard, and tok_train's tokenizer."""
    from nanochat.dataset import VAL_SHARD_INDEX, shard_filename, write_shard

    base = tmp_path_factory.mktemp("tiny_base")
    data_dir = base / "base_data"
    data_dir.mkdir()
    for index, seed in [(0, 0), (1, 1), (2, 2), (VAL_SHARD_INDEX, 99)]:
        write_shard(str(data_dir / shard_filename(index)), synthetic_documents(400, seed), row_group_size=64)
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=2000000", f"--vocab-size={BASE_DIR_VOCAB_SIZE}"],
                   cwd=REPO_ROOT, env=child_env(base), check=True, capture_output=True, timeout=300)
    return base


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base_dir):
    """A 3-step base model (d2, seq 64) in tiny_base_dir under base_checkpoints/for_loss; returns base_train's stdout."""
    from test_base_train import run_base_train

    trained = run_base_train(tiny_base_dir, "--num-iterations=3", "--model-tag=for_loss")
    assert trained.returncode == 0, trained.stderr
    return trained.stdout

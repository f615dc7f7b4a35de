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
    gpt                         (module-scoped) a tiny perturbed GPT with GQA and sliding windows
    kv_cache_for(model, B, T)   an fp32 CPU KVCache shaped for model
    decode_in_chunks(model, idx, chunks, cache)  logits of idx fed through the cache chunk by chunk
    tiny_tokenizer              a real rustbpe-trained RustBPETokenizer (vocab 300), in memory
    tiny_base_dir               a NANOCHAT_BASE_DIR with 3 train shards, the val shard (of the default
                                dataset, in its directory) and a tokenizer trained by scripts.tok_train (vocab 512)
    default_shard_dir(base)     that directory in the base dir `base`
    tiny_checkpoint             tiny_base_dir plus a 3-step d2 base model under the tag for_loss
    tiny_checkpoint_2026_01     the same run with --recipe=2026-01, under the tag for_loss_2026_01
"""

import contextlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

if "NANOCHAT_TEST_KEEP_BASE_DIR" not in os.environ:
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_test_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("NANOCHAT_COMPILE", "0")  # a cold torch.compile costs ~25 s on 2 cores; test_compile turns it on
os.environ.pop("NANOCHAT_DATASET", None)  # tests run on the default dataset unless they choose one

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


def script_env(base):
    """child_env, and a hub address that refuses at once: task data a test leaves out is missing, never downloaded."""
    return dict(child_env(base), NANOCHAT_HUB_URL=f"http://127.0.0.1:{free_port()}")


@contextlib.contextmanager
def script_environment(base):
    """What a script subprocess in `base` gets (script_env, one thread), in this process; restored after."""
    import gc

    import torch

    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update({k: v for k, v in script_env(base).items() if k.startswith(("NANOCHAT_", "OMP_", "WANDB_"))})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    # one thread, as OMP_NUM_THREADS=1 gives a subprocess: tiny models on a busy 2-core machine
    # run ~30x slower with two threads that wait on each other
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
        gc.unfreeze()  # the training loops freeze and disable the collector after their first step
        gc.enable()


def run_in_process(script_main, name, base, flags):
    """
    A script's main as `python -m` runs it (through run_script), in this process (a fresh
    interpreter costs seconds). Returns (exit code, stdout, stderr); any exception but SystemExit
    propagates, so a traceback fails the test.
    """
    from nanochat.common import run_script

    out, err, code = io.StringIO(), io.StringIO(), 0
    with script_environment(base), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_script(lambda: script_main(list(flags)), name)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


# gloo on CPU rarely aborts a rank while the interpreter exits, after all its work is done (~1 in 50
# launches here); that says nothing about the code under test, so such a run goes once more.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def gloo_aborted(results):
    """Whether any of [(returncode, stdout, stderr)] ended in gloo's abort at exit."""
    return any(code != 0 and GLOO_EXIT_ABORT in err for code, _, err in results)


def run_torchrun(args, env, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=nproc ARGS` (e.g. ["-m", "scripts.x", "--", ...]) as a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    for _ in range(2):
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if not gloo_aborted([(result.returncode, result.stdout, result.stderr)]):
            break
    return result


def kill_after_save_then_resume(name, base, flags, checkpoint_dir):
    """
    scripts.<name> with these flags (8 steps, a save every 4) as a subprocess, SIGKILLed right after
    its step-4 save; then resumed from that save in this process. Returns the resumed run's stdout.
    """
    import importlib

    kill_once_saved(["-m", f"scripts.{name}", *flags], script_env(base), checkpoint_dir / "meta_000004.json")
    assert not (checkpoint_dir / "model_000008.pt").exists()
    main = importlib.import_module(f"scripts.{name}").main
    code, resumed, err = run_in_process(main, name, base, [*flags, "--resume-from-step=4"])
    assert code == 0, resumed + err
    return resumed


# -----------------------------------------------------------------------------
# Step lines of the training scripts

BASE_STEP_LINE = re.compile(r"^step (\d{5})/\d{5} .*\| loss: ([0-9.]+) \|")
VAL_BPB_LINE = re.compile(r"^Step (\d{5}) \| Validation bpb: ([0-9.]+)$")
MID_STEP_LINE = re.compile(r"^step (\d{5}) \(.*\| loss: ([0-9.]+) \|")
SFT_STEP_LINE = re.compile(r"^Step (\d{5})/\d{5} \| Training loss: ([0-9.]+)\| lrm: [0-9.]+\| num_tokens: ([0-9,]+) \|")


def parse_lines(pattern, output, group=2, cast=str):
    """{step: group `group` of each line of output matching pattern}."""
    return {int(m.group(1)): cast(m.group(group)) for m in map(pattern.match, output.splitlines()) if m}


def parse_losses(output):
    return parse_lines(BASE_STEP_LINE, output)


def parse_val_bpb(output):
    return parse_lines(VAL_BPB_LINE, output, cast=float)


# base_train on a tiny d2 model: 4 rows of 64 tokens per step
TINY_FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256", "--eval-every=10",
              "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]


def run_base_train(base, *flags, nproc=1, timeout=300, env_overrides=None):
    env = dict(child_env(base), **(env_overrides or {}))
    if nproc > 1:
        return run_torchrun(["-m", "scripts.base_train", "--", *TINY_FLAGS, *flags], env, nproc=nproc, timeout=timeout)
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY_FLAGS, *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="module")
def gpt():
    """A tiny perturbed GPT with GQA and sliding windows of 32 in layers 0-1 (the Engine and batch-engine tests)."""
    from nanochat.gpt import GPTConfig

    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    return build_gpt(config, seed=3, perturb=0.1)


def kv_cache_for(model, batch_size, seq_len):
    """An fp32 CPU KVCache shaped for model's heads and layers."""
    import torch

    from nanochat.engine import KVCache

    c = model.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)


def decode_in_chunks(model, idx, chunks, cache):
    """model's logits for idx fed through cache chunk by chunk (sizes in chunks), concatenated along time."""
    import torch

    pieces, start = [], 0
    for n in chunks:
        pieces.append(model(idx[:, start:start + n], kv_cache=cache))
        start += n
        assert cache.get_pos() == start
    return torch.cat(pieces, dim=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer

    tokenizer = RustBPETokenizer.train_from_iterator(synthetic_documents(400, seed=7), TINY_VOCAB_SIZE)
    assert tokenizer.get_vocab_size() == TINY_VOCAB_SIZE
    return tokenizer


def default_shard_dir(base):
    """The default dataset's shard directory in the base dir `base` (where tiny_base_dir's shards are)."""
    from nanochat.dataset import get_dataset

    return base / get_dataset().dir_name


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """3 train shards (row groups of 64 docs), the pinned val shard, and tok_train's tokenizer."""
    from nanochat.dataset import get_dataset, shard_filename, write_shard

    base = tmp_path_factory.mktemp("tiny_base")
    data_dir = default_shard_dir(base)
    data_dir.mkdir()
    for index, seed in [(0, 0), (1, 1), (2, 2), (get_dataset().val_shard, 99)]:
        write_shard(str(data_dir / shard_filename(index)), synthetic_documents(400, seed), row_group_size=64)
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=2000000", f"--vocab-size={BASE_DIR_VOCAB_SIZE}"],
                   cwd=REPO_ROOT, env=child_env(base), check=True, capture_output=True, timeout=300)
    return base


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base_dir):
    """A 3-step base model (d2, seq 64) in tiny_base_dir under base_checkpoints/for_loss; returns base_train's stdout."""
    trained = run_base_train(tiny_base_dir, "--num-iterations=3", "--model-tag=for_loss")
    assert trained.returncode == 0, trained.stderr
    return trained.stdout


@pytest.fixture(scope="session")
def tiny_checkpoint_2026_01(tiny_base_dir):
    """tiny_checkpoint's run with --recipe=2026-01 (the model export_hf writes), under base_checkpoints/for_loss_2026_01."""
    trained = run_base_train(tiny_base_dir, "--num-iterations=3", "--recipe=2026-01", "--model-tag=for_loss_2026_01")
    assert trained.returncode == 0, trained.stderr
    return tiny_base_dir / "base_checkpoints" / "for_loss_2026_01"


# -----------------------------------------------------------------------------
# The chat phases: task data in the layout tasks.hub reads, the tiny base model under the tag
# chat, one midtraining run and one SFT run on it (shared by the mid, SFT, RL and chain tests)

WORDS = ["cat", "dog", "moon", "sea", "bird", "king", "road", "star"]
SUBJECTS = ["the cat", "a dog", "my teacher", "the old king", "a small bird"]
OBJECTS = ["the moon", "a red house", "the quiet sea", "many stars", "a long road"]
SMOLTALK_SUBSTITUTE = "test conversations stand in for SmolTalk train"
# 4 rows of 64 tokens per micro-batch, 1 micro-batch per step
MID_FLAGS = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256",
             "--eval-tokens=512"]


# -----------------------------------------------------------------------------
# Task data in the layout tasks.hub reads, made here


def write_split(base, repo_id, subset, split, rows, substitute=None):
    from tasks.hub import MANIFEST_NAME, PROVENANCE_NAME

    directory = os.path.join(base, "task_data", repo_id.replace("/", "--"), subset, split)  # tasks.hub's layout
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(directory, "00000.parquet"))
    if substitute:
        with open(os.path.join(directory, PROVENANCE_NAME), "w") as f:
            json.dump({"substitute": substitute}, f)
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        json.dump(["00000.parquet"], f)


def chat_rows(n, seed):
    rows = []
    for i in range(n):
        subject, obj = SUBJECTS[(i + seed) % len(SUBJECTS)], OBJECTS[(i * 3 + seed) % len(OBJECTS)]
        rows.append({"messages": [{"role": "user", "content": f"What does {subject} see?"},
                                  {"role": "assistant", "content": f"{subject.capitalize()} sees {obj}."}]})
    return rows


def mc_rows(n, prefix):
    return [{"question": f"{prefix} {i}: which one is {OBJECTS[i % 5]}?", "subject": "miscellaneous",
             "choices": [OBJECTS[(i + k) % 5] for k in range(4)], "answer": 0} for i in range(n)]


def arc_rows(n, prefix):
    return [{"id": f"{prefix}_{i}", "question": f"Which one is {OBJECTS[i % 5]}?",
             "choices": {"text": [OBJECTS[(i + k) % 5] for k in range(3)], "label": ["A", "B", "C"]}, "answerKey": "A"}
            for i in range(n)]


def gsm8k_rows(n, offset):
    return [{"question": f"What is {i} + 2?", "answer": f"{i} plus 2 is <<{i}+2={i + 2}>>{i + 2}.\n#### {i + 2}"}
            for i in range(offset, offset + n)]


def write_chat_task_data(base):
    """Every split the mid and SFT mixtures (and SFT's MMLU/ARC-Easy evaluation) read, except ARC-Challenge train."""
    write_split(base, "HuggingFaceTB/smol-smoltalk", "default", "train", chat_rows(60, 0), substitute=SMOLTALK_SUBSTITUTE)
    write_split(base, "HuggingFaceTB/smol-smoltalk", "default", "test", chat_rows(20, 1))
    write_split(base, "cais/mmlu", "all", "auxiliary_train", mc_rows(20, "aux"))
    write_split(base, "cais/mmlu", "all", "test", mc_rows(12, "test"))
    write_split(base, "openai/gsm8k", "main", "train", gsm8k_rows(20, 0))
    write_split(base, "openai/gsm8k", "main", "test", gsm8k_rows(8, 100))
    write_split(base, "allenai/ai2_arc", "ARC-Easy", "train", arc_rows(20, "easy"))
    write_split(base, "allenai/ai2_arc", "ARC-Easy", "test", arc_rows(8, "easy_test"))
    (base / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")


# -----------------------------------------------------------------------------
# Shared fixtures: a base dir with the tiny base model and the task data, and one midtraining run


@pytest.fixture(scope="session")
def chat_base_dir(tiny_checkpoint, tiny_base_dir, tmp_path_factory):
    """tiny_base_dir's tokenizer, its 3-step d2 base model under the tags chat and bad, and the task data."""
    base = tmp_path_factory.mktemp("chat_base")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    for tag in ("chat", "bad"):
        shutil.copytree(tiny_base_dir / "base_checkpoints" / "for_loss", base / "base_checkpoints" / tag)
    write_chat_task_data(base)
    return base


@pytest.fixture(scope="session")
def mid_run(chat_base_dir):
    """8 steps of midtraining on the tiny base model (tag chat), saved at 4 and 8; returns its stdout."""
    from scripts.mid_train import main

    code, out, err = run_in_process(main, "mid_train", chat_base_dir,
                                    [*MID_FLAGS, "--model-tag=chat", "--num-iterations=8", "--eval-every=4", "--save-every=4"])
    assert code == 0, out + err
    return out


SFT_FLAGS = ["--device-type=cpu", "--device-batch-size=4", "--target-examples-per-step=8", "--eval-steps=2",
             "--init-lr-frac=0.5", "--eval-metrics-max-problems=4", "--eval-metrics-every=4"]


@pytest.fixture(scope="session")
def sft_run(mid_run, chat_base_dir):
    """8 SFT steps on the midtrained tiny model (tag chat), saved at 4 and 8; returns its stdout."""
    from scripts.chat_sft import main

    code, out, err = run_in_process(main, "chat_sft", chat_base_dir,
                                    [*SFT_FLAGS, "--model-tag=chat", "--num-iterations=8", "--eval-every=4", "--save-every=4"])
    assert code == 0, out + err
    return out


# -----------------------------------------------------------------------------
# CORE eval bundles made here (test_core_eval, and the base_eval / base_train CORE runs)


def synthetic_tasks(num_examples=16, seed=0):
    """A small task of each type from the test grammar."""
    import random

    rng = random.Random(seed)
    docs = synthetic_documents(3 * num_examples, seed=seed)
    words = lambda doc, n: " ".join(doc.split()[:n])  # noqa: E731
    mc = [{"query": words(docs[i], 4), "choices": [words(docs[(i + j) % len(docs)], rng.randint(1, 5)) for j in range(4)],
           "gold": rng.randrange(4)} for i in range(num_examples)]
    schema = [{"context_options": [words(docs[i], rng.randint(1, 4)), words(docs[i + 1], rng.randint(1, 4))],
               "continuation": words(docs[i + 2], 4), "gold": rng.randrange(2)} for i in range(num_examples)]
    lm = [{"context": words(docs[i], rng.randint(2, 8)), "continuation": words(docs[i + 1], rng.randint(1, 3))} for i in range(num_examples)]
    return {"multiple_choice": mc, "schema": schema, "language_modeling": lm}


def write_bundle_dir(directory, tasks, offline=False):
    """A bundle directory: tasks is [(label, task_type, shots, delimiter, baseline, items)]."""
    import yaml

    from nanochat.core_eval import OFFLINE_PROVENANCE

    os.makedirs(os.path.join(directory, "eval_data", "t"), exist_ok=True)
    entries, lines = [], ["Eval Task,Random baseline"]
    for label, task_type, shots, delimiter, baseline, items in tasks:
        with open(os.path.join(directory, "eval_data", "t", f"{label}.jsonl"), "w") as f:
            f.write("".join(json.dumps(item) + "\n" for item in items))
        entries.append({"label": label, "dataset_uri": f"t/{label}.jsonl", "num_fewshot": [shots], "icl_task_type": task_type,
                        "continuation_delimiter": delimiter})
        lines.append(f"{label},{baseline}")
    with open(os.path.join(directory, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": entries}, f)
    with open(os.path.join(directory, "eval_meta_data.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if offline:
        with open(os.path.join(directory, OFFLINE_PROVENANCE), "w") as f:
            json.dump({"built_by": "test"}, f)
    return directory


def small_bundle(directory, offline=False):
    tasks = synthetic_tasks(num_examples=10, seed=1)
    return write_bundle_dir(directory, [
        ("mc_task", "multiple_choice", 2, "\nAnswer: ", 25, tasks["multiple_choice"]),
        ("schema_task", "schema", 0, " ", 50, tasks["schema"]),
        ("lm_task", "language_modeling", 1, " ", 0, tasks["language_modeling"]),
    ], offline)

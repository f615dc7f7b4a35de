"""
Test-wide setup and the shared tiny artefacts.

The environment lines run before any test module imports nanochat, so every test works in a
throwaway artifact directory and nothing touches ~/.cache/nanochat or the network.

Shared builders (session-scoped where they cost seconds, so each is made once per run):
    free_port()                 a TCP port on 127.0.0.1 nobody listens on (for gloo / servers)
    synthetic_documents(n, s)   English-like documents from a tiny grammar: learnable, varied lengths
    child_env(base)             the environment for a script subprocess working in `base`
    tiny_tokenizer              a real rustbpe-trained RustBPETokenizer (vocab 512), in memory
    tiny_base_dir               a NANOCHAT_BASE_DIR with 3 train shards, the val shard and a
                                tokenizer trained by scripts.tok_train (vocab 512)
    tiny_checkpoint             tiny_base_dir plus a 3-step d2 base model under the tag for_loss
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest

if "NANOCHAT_TEST_KEEP_BASE_DIR" not in os.environ:
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_test_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
os.environ.setdefault("NANOCHAT_COMPILE", "0")  # a cold torch.compile costs ~25 s on 2 cores; test_compile turns it on

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VOCAB_SIZE = 512


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer

    return RustBPETokenizer.train_from_iterator(synthetic_documents(400, seed=7), TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """3 train shards (row groups of 64 docs), the pinned val shard, and tok_train's tokenizer."""
    from nanochat.dataset import VAL_SHARD_INDEX, shard_filename, write_shard

    base = tmp_path_factory.mktemp("tiny_base")
    data_dir = base / "base_data"
    data_dir.mkdir()
    for index, seed in [(0, 0), (1, 1), (2, 2), (VAL_SHARD_INDEX, 99)]:
        write_shard(str(data_dir / shard_filename(index)), synthetic_documents(400, seed), row_group_size=64)
    subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=2000000", f"--vocab-size={TINY_VOCAB_SIZE}"],
                   cwd=REPO_ROOT, env=child_env(base), check=True, capture_output=True, timeout=300)
    return base


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base_dir):
    """A 3-step base model (d2, seq 64) in tiny_base_dir under base_checkpoints/for_loss; returns base_train's stdout."""
    from test_base_train import run_base_train

    trained = run_base_train(tiny_base_dir, "--num-iterations=3", "--model-tag=for_loss")
    assert trained.returncode == 0, trained.stderr
    return trained.stdout

"""
Faults a long run meets, each as one line that names the file or setting and what to do, with no
traceback: a cut or overwritten pretraining shard, a damaged tokenizer, wandb asked for without a login.
"""

import os
import pickle
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, child_env, default_shard_dir
from nanochat.dataset import DamagedShardError, iter_row_groups
from nanochat.tokenizer import DamagedTokenizerError, RustBPETokenizer, get_token_bytes
from nanochat.training import wandb_login_problem

TINY_RUN = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256", "--eval-every=-1",
            "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--num-iterations=2"]


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_cut_shard_is_named_when_read(tiny_base_dir, tmp_path):
    shard = tmp_path / "shard_00000.parquet"
    shutil.copy(default_shard_dir(tiny_base_dir) / "shard_00000.parquet", shard)
    cut_in_half(shard)
    with pytest.raises(DamagedShardError) as damaged:
        list(iter_row_groups([str(shard)]))
    assert str(shard) in str(damaged.value) and "python -m nanochat.dataset" in str(damaged.value)


@pytest.mark.parametrize("content", [b"\x00garbage", pickle.dumps({"not": "an encoding"})])
def test_a_damaged_tokenizer_is_named_with_the_command_that_rebuilds_it(tmp_path, content):
    (tmp_path / "tokenizer.pkl").write_bytes(content)
    with pytest.raises(DamagedTokenizerError) as damaged:
        RustBPETokenizer.from_directory(str(tmp_path))
    assert str(tmp_path / "tokenizer.pkl") in str(damaged.value) and "python -m scripts.tok_train" in str(damaged.value)


def test_a_damaged_token_bytes_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "token_bytes.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DamagedTokenizerError, match="token_bytes.pt is damaged"):
        get_token_bytes()


def run_base_train(base, *flags, env=None):
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY_RUN, *flags], cwd=REPO_ROOT,
                            env=env or child_env(base), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_base_train_stops_with_one_line_on_a_damaged_tokenizer_and_on_a_cut_shard(tiny_base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(default_shard_dir(tiny_base_dir), default_shard_dir(base))
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    good_tokenizer = (base / "tokenizer" / "tokenizer.pkl").read_bytes()

    cut_in_half(base / "tokenizer" / "tokenizer.pkl")
    code, out, err = run_base_train(base)
    assert code == 2 and "Traceback" not in out + err, out + err
    assert f"base_train: tokenizer file {base / 'tokenizer' / 'tokenizer.pkl'} is damaged" in out

    (base / "tokenizer" / "tokenizer.pkl").write_bytes(good_tokenizer)
    cut_in_half(default_shard_dir(base) / "shard_00000.parquet")
    code, out, err = run_base_train(base)
    assert code == 2 and "Traceback" not in out + err, out + err
    assert f"base_train: shard {default_shard_dir(base) / 'shard_00000.parquet'} is damaged" in out
    assert not (base / "base_checkpoints").exists()


def test_wandb_without_a_login_is_named_before_anything_runs(tmp_path):
    home = {"HOME": str(tmp_path)}  # no ~/.netrc
    assert "wandb login" in wandb_login_problem("speedrun", environ=home)
    assert wandb_login_problem("dummy", environ=home) is None
    assert wandb_login_problem("speedrun", environ={**home, "WANDB_MODE": "offline"}) is None
    assert wandb_login_problem("speedrun", environ={**home, "WANDB_API_KEY": "k"}) is None
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert wandb_login_problem("speedrun", environ=home) is None

    base = tmp_path / "empty_base"  # no tokenizer: a run past the wandb check would fail on that instead
    env = child_env(base)
    env.update(HOME=str(tmp_path / "nohome"))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        env.pop(key, None)
    code, out, err = run_base_train(base, "--run=speedrun", env=env)
    assert code == 2 and "Traceback" not in out + err, out + err
    assert "base_train: --run=speedrun (WANDB_RUN) logs to wandb, but this machine has no wandb login" in out

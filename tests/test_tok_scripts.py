"""
scripts/tok_train.py and scripts/tok_eval.py end to end, as subprocesses, on small shards written
into a temporary $NANOCHAT_BASE_DIR: the outputs must exist, load, and agree with each other.
"""

import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_in_process
from nanochat.dataset import get_dataset, shard_filename, write_shard
from nanochat.reference_encodings import REFERENCE_ENCODINGS, REFS_DIRNAME
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, compute_token_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where `python -m dev.offline_data tiktoken` puts them by default (the tests' own base dir is a temp dir)
USER_REFS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nanochat", REFS_DIRNAME)
VOCAB_SIZE, MAX_CHARS, DOC_CAP = 512, 300_000, 400


def make_docs(num_docs, seed):
    rng = random.Random(seed)
    syllables = ["ba", "ne", "lo", "ri", "tu", "sam", "kor", "ex", "th", "ing", "er", "an", "ol"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    extras = ["I'm", "42", "1999", "3.5%", "café", "東京", "😀", "(a, b)", "\n\n"]
    return [" ".join(rng.choices(words, weights)[0] if rng.random() < 0.9 else rng.choice(extras)
                     for _ in range(rng.randint(10, 200))) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Two train shards and the val shard of the default dataset, row groups of 256 docs."""
    base = tmp_path_factory.mktemp("tok_scripts_base")
    data_dir = base / get_dataset().dir_name
    for index, seed in [(0, 1), (1, 2), (get_dataset().val_shard, 3)]:
        write_shard(str(data_dir / shard_filename(index)), make_docs(600, seed), row_group_size=256)
    return base


def run_script(module, base_dir, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir),
               # A dead proxy makes any attempt of tiktoken to download fail at once, online or not.
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def trained(base_dir):
    stdout = run_script("scripts.tok_train", base_dir, f"--max-chars={MAX_CHARS}", "--vocab-size", str(VOCAB_SIZE),
                        "--doc_cap", str(DOC_CAP))  # underscore spelling is accepted too
    return base_dir, stdout


def test_tok_train_writes_a_loadable_tokenizer_and_matching_token_bytes(trained):
    base_dir, stdout = trained
    tokenizer = RustBPETokenizer.from_directory(str(base_dir / "tokenizer"))
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert [tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - 9, VOCAB_SIZE))
    token_bytes = torch.load(base_dir / "tokenizer" / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert torch.equal(token_bytes, compute_token_bytes(tokenizer))
    assert "Training time:" in stdout
    assert not [f for f in os.listdir(base_dir / "tokenizer") if f.endswith(".tmp")]


def test_tok_train_stops_just_past_max_chars_and_crops_documents(trained):
    _, stdout = trained
    match = re.search(r"Trained on ([\d,]+) docs \(([\d,]+) chars\)", stdout)
    docs, chars = (int(g.replace(",", "")) for g in match.groups())
    assert MAX_CHARS < chars <= MAX_CHARS + DOC_CAP  # the last document crosses the budget, then it stops
    assert chars <= docs * DOC_CAP


def test_tok_train_logs_its_report_section(trained):
    base_dir, _ = trained
    section = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert section.startswith("## Tokenizer training\ntimestamp: ")
    for line in [f"- max_chars: {MAX_CHARS:,}", f"- vocab_size: {VOCAB_SIZE}", "- num_special_tokens: 9", "- train_time: "]:
        assert line in section
    stats = dict(re.findall(r"- (token_bytes_\w+): ([\d.]+)", section))
    assert int(stats["token_bytes_min"]) == 1 and float(stats["token_bytes_mean"]) > 1


@pytest.mark.parametrize("how", ["flag", "env", "default"])
def test_tok_train_reads_the_dataset_chosen_by_flag_or_env(how, tmp_path, monkeypatch):
    """A base dir with both datasets: 300 ClimbMix documents to train on, 120 FineWeb-Edu ones."""
    from scripts.tok_train import main as tok_train_main

    for name, num_docs in (("climbmix", 300), ("fineweb", 120)):
        chosen = get_dataset(name)
        for index in (0, chosen.val_shard):
            write_shard(str(tmp_path / chosen.dir_name / shard_filename(index)), make_docs(num_docs, index), row_group_size=64)
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    if how == "env":
        monkeypatch.setenv("NANOCHAT_DATASET", "fineweb")
    flags = ["--dataset=fineweb"] if how == "flag" else []
    code, out, err = run_in_process(tok_train_main, "tok_train", tmp_path, ["--max-chars=10000000", "--vocab-size=300", *flags])
    assert code == 0, out + err
    expected, title = ("climbmix", "ClimbMix-400B") if how == "default" else ("fineweb", "FineWeb-Edu-100B")
    assert f"dataset: {title}" in out
    assert f"Trained on {300 if expected == 'climbmix' else 120} docs" in out  # the train shard only, never val
    assert f"\n- dataset: {expected}\n" in (tmp_path / "report" / "tokenizer-training.md").read_text()


def test_tok_train_help_states_the_defaults(capsys):
    from scripts.tok_train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines by terminal width
    assert "(default: 2B)" in help_text and "32768" in help_text and "10,000" in help_text


def test_tok_eval_without_baselines_reports_ours(trained):
    base_dir, _ = trained
    shutil.rmtree(base_dir / REFS_DIRNAME, ignore_errors=True)
    stdout = run_script("scripts.tok_eval", base_dir)
    assert "GPT-2 baseline unavailable" in stdout and "GPT-4 baseline unavailable" in stdout
    unavailable = [line for line in stdout.splitlines() if "baseline unavailable" in line]
    assert len(unavailable) == 2 and all("python -m dev.offline_data tiktoken" in line for line in unavailable)
    section = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", section, re.MULTILINE)
    assert [r[0] for r in rows] == ["news", "korean", "code", "math", "science", "climbmix-train", "climbmix-val"]
    for _, num_bytes, tokens, ratio in rows:
        assert abs(int(num_bytes) / int(tokens) - float(ratio)) < 0.01


@pytest.mark.slow
@pytest.mark.skipif(not all(os.path.exists(os.path.join(USER_REFS_DIR, spec.filename)) for spec in REFERENCE_ENCODINGS.values()),
                    reason="reference rank files not fetched (run `python -m dev.offline_data tiktoken`)")
def test_tok_eval_compares_with_gpt2_and_gpt4(trained):
    base_dir, _ = trained
    shutil.copytree(USER_REFS_DIR, base_dir / REFS_DIRNAME, dirs_exist_ok=True)
    stdout = run_script("scripts.tok_eval", base_dir)
    assert "Comparison with GPT-2:" in stdout and "Comparison with GPT-4:" in stdout
    assert "GPT-2: 50,257" in stdout and "GPT-4: 100,277" in stdout
    section = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Comparison with GPT-2" in section and "### Comparison with GPT-4" in section
    rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| (\d+) \| [\d.]+ \| (\d+) \| [\d.]+ \| ([+-][\d.]+)% \|$", section, re.MULTILINE)
    assert len(rows) == 14
    for _, _, baseline_tokens, our_tokens, diff in rows:
        expected = (int(baseline_tokens) - int(our_tokens)) / int(baseline_tokens) * 100
        assert abs(expected - float(diff)) < 0.051


@pytest.mark.parametrize("module, message", [
    ("scripts.tok_train", "tok_train: no ClimbMix-400B train shards in"),
    ("scripts.tok_eval", "tok_eval: no tokenizer at"),
])
def test_missing_inputs_fail_with_one_line_that_says_what_to_run(tmp_path, module, message):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))  # empty: no shards, no tokenizer
    result = subprocess.run([sys.executable, "-m", module], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stdout
    assert "python -m" in result.stdout.split(message)[1].splitlines()[0]  # the fix: which command to run
    assert "Traceback" not in result.stderr

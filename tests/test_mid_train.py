"""
Midtraining: the packing loader of nanochat.chat_data (whole conversations, BOS padding with
ignored targets, ranks disjoint, exact resume, re-dealing on another number of ranks), the
identity conversations, and scripts/mid_train.py end to end on CPU with the tiny base model and
task data written here in the hub loader's layout: it lowers the loss, lists the mixture with its
substitutes, writes a checkpoint load_model("mid") reads, resumes a run SIGKILLed after a save
with identical losses, resumes a 2-rank run on 1 rank (with chat_sft in the same launch), and
rejects bad input at start.

The chat fixtures (chat_base_dir, mid_run) are shared with tests/test_chat_sft.py.
"""

import contextlib
import gc
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO_ROOT, child_env, free_port, kill_once_saved
from nanochat.chat_data import loader_state_for_rank, packed_conversation_batches
from nanochat.checkpoint_manager import load_model
from nanochat.common import ConfigError, run_script
from tasks.hub import MANIFEST_NAME, PROVENANCE_NAME
from test_base_train import GLOO_EXIT_ABORT

WORDS = ["cat", "dog", "moon", "sea", "bird", "king", "road", "star"]
SUBJECTS = ["the cat", "a dog", "my teacher", "the old king", "a small bird"]
OBJECTS = ["the moon", "a red house", "the quiet sea", "many stars", "a long road"]
SMOLTALK_SUBSTITUTE = "test conversations stand in for SmolTalk train"
# 4 rows of 64 tokens per micro-batch, 1 micro-batch per step
MID_FLAGS = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256",
             "--eval-tokens=512"]
MID_STEP_LINE = re.compile(r"^step (\d{5}) \(.*\| loss: ([0-9.]+) \|")
VAL_BPB_LINE = re.compile(r"^Step (\d{5}) \| Validation bpb: ([0-9.]+)$")


# -----------------------------------------------------------------------------
# Task data in the layout tasks.hub reads, made here


def write_split(base, repo_id, subset, split, rows, substitute=None):
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
    """tiny_base_dir's tokenizer, its 3-step d2 base model under the tags chat, bad and two, and the task data."""
    base = tmp_path_factory.mktemp("chat_base")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    for tag in ("chat", "bad", "two"):
        shutil.copytree(tiny_base_dir / "base_checkpoints" / "for_loss", base / "base_checkpoints" / tag)
    write_chat_task_data(base)
    return base


def phase_env(base):
    """child_env, and a hub address that refuses at once: a split the test leaves out is missing, never downloaded."""
    return dict(child_env(base), NANOCHAT_HUB_URL=f"http://127.0.0.1:{free_port()}")


@contextlib.contextmanager
def phase_environment(base):
    """The environment of a script subprocess (phase_env, one thread), in this process; gc and threads as they were after."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update({k: v for k, v in phase_env(base).items() if k.startswith(("NANOCHAT_", "WANDB_"))})
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
        gc.unfreeze()  # the training loop freezes and disables the collector after its first step
        gc.enable()


def run_phase(main, name, base, flags):
    """A script's main through run_script, in this process. Returns (exit code, stdout)."""
    out = io.StringIO()
    code = 0
    with phase_environment(base), contextlib.redirect_stdout(out):
        try:
            run_script(lambda: main(list(flags)), name)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue()


def parse_mid_losses(output):
    return {int(m.group(1)): m.group(2) for m in map(MID_STEP_LINE.match, output.splitlines()) if m}


def parse_val_bpb(output):
    return {int(m.group(1)): float(m.group(2)) for m in map(VAL_BPB_LINE.match, output.splitlines()) if m}


@pytest.fixture(scope="session")
def mid_run(chat_base_dir):
    """8 steps of midtraining on the tiny base model (tag chat), saved at 4 and 8; returns its stdout."""
    from scripts.mid_train import main

    code, out = run_phase(main, "mid_train", chat_base_dir,
                          [*MID_FLAGS, "--model-tag=chat", "--num-iterations=8", "--eval-every=4", "--save-every=4"])
    assert code == 0, out
    return out


# -----------------------------------------------------------------------------
# The packing loader


def numbered_conversations(n):
    """Conversation i is told apart by its number; lengths vary from a few tokens to longer than a row."""
    return [{"messages": [{"role": "user", "content": f"q{i} " + "the cat sees the moon. " * (i % 7)},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(n)]


def split_row(row, renders, bos):
    """The conversation indices a packed row holds, in order, and where its content ends; fails on anything else."""
    placed, position = [], 0
    while position < len(row):
        match = [i for i, ids in renders.items() if row[position:position + len(ids)] == ids]
        if not match:
            assert all(token == bos for token in row[position:]), "a row is whole conversations, then BOS padding"
            break
        longest = max(match, key=lambda i: len(renders[i]))
        placed.append(longest)
        position += len(renders[longest])
    return placed, position


def full_rows(inputs, targets, bos):
    """The packed rows of T+1 tokens back from a batch: inputs, then the last target (BOS where it is ignored)."""
    return [row + [bos if row_targets[-1] == -1 else row_targets[-1]] for row, row_targets in zip(inputs.tolist(), targets.tolist())]


def test_packing_fills_rows_with_whole_conversations_and_pads_with_ignored_bos(tiny_tokenizer):
    dataset, T = numbered_conversations(60), 48
    renders = {i: tiny_tokenizer.render_conversation(c, max_tokens=T + 1)[0] for i, c in enumerate(dataset)}
    assert max(len(ids) for ids in renders.values()) == T + 1  # the longest are rendered only up to a row
    bos = tiny_tokenizer.get_bos_token_id()
    loader = packed_conversation_batches(dataset, tiny_tokenizer, 4, T, rank=0, world_size=1, buffer_size=8)
    seen, padded_rows = [], 0
    for _ in range(6):
        inputs, targets, state = next(loader)
        for row, row_targets in zip(full_rows(inputs, targets, bos), targets.tolist()):
            placed, content = split_row(row, renders, bos)
            assert placed, "every row holds at least one conversation"
            seen += placed
            # targets are the next tokens of the content; from the one that would predict the first pad on, -1
            expected = [row[t + 1] if t < content - 1 else -1 for t in range(T)]
            assert row_targets == expected
            padded_rows += content < T + 1
    assert padded_rows > 0  # padding happened, so the check above saw it
    assert len(seen) == len(set(seen))  # within one pass, no conversation twice
    assert state["consumed"] == len(seen)  # progress counts the conversations placed


def test_two_ranks_see_disjoint_conversations_and_a_state_resumes_exactly(tiny_tokenizer):
    dataset, T = numbered_conversations(80), 48
    renders = {i: tiny_tokenizer.render_conversation(c, max_tokens=T + 1)[0] for i, c in enumerate(dataset)}
    bos = tiny_tokenizer.get_bos_token_id()

    def placed_in(batches):
        return [i for inputs, targets, _ in batches for row in full_rows(inputs, targets, bos) for i in split_row(row, renders, bos)[0]]

    runs = {}
    for rank in (0, 1):
        loader = packed_conversation_batches(dataset, tiny_tokenizer, 2, T, rank=rank, world_size=2, buffer_size=6)
        runs[rank] = [tuple(t.clone() if hasattr(t, "clone") else t for t in next(loader)) for _ in range(4)]
        assert all(i % 2 == rank for i in placed_in(runs[rank])), "rank r reads conversations r, r+2, ..."
    assert not set(placed_in(runs[0])) & set(placed_in(runs[1]))

    # the state yielded with batch 2 of rank 1 gives batches 3 and 4 again
    resumed = packed_conversation_batches(dataset, tiny_tokenizer, 2, T, rank=1, world_size=2, buffer_size=6,
                                          resume_state=runs[1][1][2])
    for expected in runs[1][2:]:
        got = next(resumed)
        assert got[0].equal(expected[0]) and got[1].equal(expected[1]) and got[2] == expected[2]

    # both ranks' states after batch 2, re-dealt to one rank: every conversation not yet placed waits
    # in its buffer or lies ahead of its cursor in this pass, so none is lost
    placed_before = set(placed_in(runs[0][:2] + runs[1][:2]))
    state = loader_state_for_rank([runs[0][1][2], runs[1][1][2]], 0, 1)
    assert state["epoch"] == 1
    assert set(range(80)) - placed_before <= set(state["buffer"]) | set(range(state["cursor"], 80))
    one = packed_conversation_batches(dataset, tiny_tokenizer, 2, T, rank=0, world_size=1, buffer_size=6, resume_state=state)
    assert set(placed_in([next(one) for _ in range(3)])).isdisjoint(placed_before - set(range(state["cursor"], 80)))


# -----------------------------------------------------------------------------
# Identity conversations


def test_identity_file_is_used_when_present_else_the_labelled_offline_set(tmp_path, monkeypatch):
    from tasks.identity import OfflineIdentity, identity_conversations

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    offline = identity_conversations()
    assert isinstance(offline, OfflineIdentity) and "nanochat" in offline.substitute
    assert len(offline) >= 20 and all("nanochat" in json.dumps(offline[i]) or len(offline[i]["messages"]) >= 2
                                      for i in range(len(offline)))
    lines = [[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "me"}]] * 2
    (tmp_path / "identity_conversations.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    task = identity_conversations()
    assert len(task) == 2 and not getattr(task, "substitute", None)
    (tmp_path / "identity_conversations.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"identity_conversations.jsonl has 1 bad line\(s\) \(first: line 2: not valid JSON"):
        identity_conversations()


# -----------------------------------------------------------------------------
# scripts/mid_train.py end to end


def test_mid_train_lowers_the_loss_and_writes_a_checkpoint_load_model_reads(mid_run, chat_base_dir):
    losses = {step: float(loss) for step, loss in parse_mid_losses(mid_run).items()}
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < 0.9 * losses[1], losses
    assert set(parse_val_bpb(mid_run)) == {0, 4, 8}
    # the mixture, once, with its rows: the labelled substitutes (smoltalk here, the offline identity set)
    assert mid_run.count("Training mixture: ") == 1
    assert f"  SmolTalk train: 60 rows, SUBSTITUTE: {SMOLTALK_SUBSTITUTE}\n" in mid_run
    assert "  identity conversations x2: 30 rows, SUBSTITUTE: nanochat's own 30 offline identity conversations" in mid_run
    assert "  SpellingBee (80K): 80,000 rows\n" in mid_run
    report = (chat_base_dir / "report" / "midtraining.md").read_text()
    assert "- Number of iterations: 8\n" in report and f"SUBSTITUTE: {SMOLTALK_SUBSTITUTE}" in report

    checkpoint_dir = chat_base_dir / "mid_checkpoints" / "chat"
    assert (checkpoint_dir / "optim_000008_rank0.pt").exists()
    meta = json.loads((checkpoint_dir / "meta_000008.json").read_text())
    base_meta = json.loads((chat_base_dir / "base_checkpoints" / "chat" / "meta_000003.json").read_text())
    assert meta["model_config"] == base_meta["model_config"]  # the full config, window_pattern included
    with phase_environment(chat_base_dir):
        model, _, meta = load_model("mid", "cpu", phase="eval", model_tag="chat")
    assert meta["step"] == 8 and model.config.window_pattern == base_meta["model_config"]["window_pattern"]


def kill_after_save_then_resume(main, name, base, flags, checkpoint_dir):
    """
    The phase `name` (its script, with these flags: 8 steps, a save every 4) as a subprocess,
    SIGKILLed right after its step-4 save; then resumed from that save in this process.
    Returns the resumed run's stdout.
    """
    kill_once_saved(["-m", f"scripts.{name}", *flags], phase_env(base), checkpoint_dir / "meta_000004.json")
    assert not (checkpoint_dir / "model_000008.pt").exists()
    code, resumed = run_phase(main, name, base, [*flags, "--resume-from-step=4"])
    assert code == 0, resumed
    return resumed


def test_mid_train_killed_after_a_save_resumes_with_identical_losses(mid_run, chat_base_dir):
    from scripts.mid_train import main

    shutil.copytree(chat_base_dir / "base_checkpoints" / "chat", chat_base_dir / "base_checkpoints" / "killed")
    flags = [*MID_FLAGS, "--model-tag=killed", "--num-iterations=8", "--eval-every=4", "--save-every=4"]
    resumed = kill_after_save_then_resume(main, "mid_train", chat_base_dir, flags, chat_base_dir / "mid_checkpoints" / "killed")
    assert "Resuming from step 4" in resumed
    reference = parse_mid_losses(mid_run)
    assert parse_mid_losses(resumed) == {step: reference[step] for step in range(5, 9)}
    assert parse_val_bpb(resumed)[8] == parse_val_bpb(mid_run)[8]


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size=300"], "--total-batch-size=300 must be a positive multiple of device_batch_size * max_seq_len * "
                                 "world_size = 4 * 64 * 1 = 256"),
    (["--resume-from-step=3"], "--resume-from-step=3: no checkpoint at"),
    (["--model-tag=never_trained"], "no base checkpoint in"),
])
def test_mid_train_bad_input_is_one_line_at_start_and_writes_nothing(chat_base_dir, flags, message):
    from scripts.mid_train import main

    code, out = run_phase(main, "mid_train", chat_base_dir, [*MID_FLAGS, "--model-tag=bad", "--num-iterations=2", *flags])
    assert code == 2, out
    error_lines = [line for line in out.splitlines() if line.startswith("mid_train: ")]
    assert len(error_lines) == 1 and message in error_lines[0], out
    if "never_trained" in flags[0]:
        assert "run `python -m scripts.base_train` first" in error_lines[0]
    assert not (chat_base_dir / "mid_checkpoints" / "bad").exists()
    assert not (chat_base_dir / "mid_checkpoints" / "never_trained").exists()


def test_mid_train_rejects_an_identity_file_with_bad_lines(chat_base_dir, tmp_path):
    from scripts.mid_train import main

    for name in ("tokenizer", "base_checkpoints", "task_data", "words_alpha.txt"):
        os.symlink(chat_base_dir / name, tmp_path / name)
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    (tmp_path / "identity_conversations.jsonl").write_text(f"{good}\n[{{\"role\": \"assistant\"}}]\n")
    code, out = run_phase(main, "mid_train", tmp_path, [*MID_FLAGS, "--model-tag=bad", "--num-iterations=2"])
    assert code == 2, out
    assert "identity_conversations.jsonl has 1 bad line(s) (first: line 2: a conversation needs at least 2 messages" in out
    assert not (tmp_path / "mid_checkpoints").exists()


# -----------------------------------------------------------------------------
# 2 ranks save, 1 rank resumes (midtraining, then SFT on its result, in one launch)

# One launch, two phases: each ends by leaving its process group, and a process group cannot be
# joined again through torchrun's own store, so SFT meets at a store of its own (rank 0 hosts it).
TWO_RANK_WORKER = """
import os
from scripts.chat_sft import main as chat_sft
from scripts.mid_train import main as mid_train
mid_train({mid_flags!r})
os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT="{sft_port}")
chat_sft({sft_flags!r})
"""


@pytest.mark.slow  # three interpreters start (the launcher and 2 ranks): ~20 s idle, ~45 s on a busy 2-core box
def test_a_two_rank_save_resumes_on_one_rank(chat_base_dir, tmp_path):
    from scripts.chat_sft import main as chat_sft
    from scripts.mid_train import main as mid_train
    from test_chat_sft import SFT_FLAGS, parse_sft_losses, parse_sft_tokens

    mid_flags = [*MID_FLAGS, "--total-batch-size=512", "--model-tag=two", "--num-iterations=4", "--save-every=2",
                 "--eval-every=-1"]
    sft_flags = [*SFT_FLAGS, "--model-tag=two", "--num-iterations=4", "--save-every=2", "--eval-every=-1"]
    worker = tmp_path / "two_rank_worker.py"
    worker.write_text(TWO_RANK_WORKER.format(mid_flags=mid_flags, sft_flags=sft_flags, sft_port=free_port()))
    env = dict(phase_env(chat_base_dir), PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    two = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if two.returncode != 0 and GLOO_EXIT_ABORT in two.stderr:
        two = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    for phase in ("mid_checkpoints", "chatsft_checkpoints"):
        for rank in (0, 1):
            assert (chat_base_dir / phase / "two" / f"optim_000002_rank{rank}.pt").exists()

    # Same weights and optimizer state (re-sharded), the unread data re-dealt to one rank: the loss
    # goes on from where the 2-rank run was, not from where a fresh optimizer would take it.
    code, mid_one = run_phase(mid_train, "mid_train", chat_base_dir, [*mid_flags, "--resume-from-step=2"])
    assert code == 0, mid_one
    assert "Resuming a 2-rank run on 1 ranks" in mid_one
    two_losses, one_losses = parse_mid_losses(two.stdout), parse_mid_losses(mid_one)
    assert sorted(one_losses) == [3, 4]
    for step in (3, 4):
        assert float(one_losses[step]) == pytest.approx(float(two_losses[step]), rel=0.05)

    code, sft_one = run_phase(chat_sft, "chat_sft", chat_base_dir, [*sft_flags, "--resume-from-step=2"])
    assert code == 0, sft_one
    assert sorted(parse_sft_losses(sft_one)) == [2, 3]
    # SFT ranks read in lockstep, so one rank picks up exactly where both stood: each step trains on
    # the same conversations (the same number of supervised tokens) as the 2-rank run did
    two_tokens, one_tokens = parse_sft_tokens(two.stdout), parse_sft_tokens(sft_one)
    assert {step: one_tokens[step] for step in (2, 3)} == {step: two_tokens[step] for step in (2, 3)}

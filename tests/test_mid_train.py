"""
Midtraining: the packing loader of nanochat.chat_data (whole conversations, BOS padding with
ignored targets, ranks disjoint, exact resume, re-dealing on another number of ranks), the
identity conversations, and scripts/mid_train.py end to end on CPU with the tiny base model and
task data written here in the hub loader's layout: it lowers the loss, lists the mixture with its
substitutes, writes a checkpoint load_model("mid") reads, resumes a run SIGKILLed after a save
with identical losses, and rejects bad input at start. The chat fixtures (chat_base_dir, mid_run)
live in conftest.py.
"""

import json
import os
import shutil

import pytest

from conftest import (
    MID_FLAGS, MID_STEP_LINE, SMOLTALK_SUBSTITUTE, kill_after_save_then_resume, parse_lines, parse_val_bpb, run_in_process,
    script_environment,
)
from nanochat.chat_data import loader_state_for_rank, packed_conversation_batches
from nanochat.checkpoint_manager import load_model
from nanochat.common import ConfigError

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
    losses = {step: float(loss) for step, loss in parse_lines(MID_STEP_LINE, mid_run).items()}
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
    with script_environment(chat_base_dir):
        model, _, meta = load_model("mid", "cpu", phase="eval", model_tag="chat")
    assert meta["step"] == 8 and model.config.window_pattern == base_meta["model_config"]["window_pattern"]


def test_mid_train_killed_after_a_save_resumes_with_identical_losses(mid_run, chat_base_dir):
    shutil.copytree(chat_base_dir / "base_checkpoints" / "chat", chat_base_dir / "base_checkpoints" / "killed")
    flags = [*MID_FLAGS, "--model-tag=killed", "--num-iterations=8", "--eval-every=4", "--save-every=4"]
    resumed = kill_after_save_then_resume("mid_train", chat_base_dir, flags, chat_base_dir / "mid_checkpoints" / "killed")
    assert "Resuming from step 4" in resumed
    reference = parse_lines(MID_STEP_LINE, mid_run)
    assert parse_lines(MID_STEP_LINE, resumed) == {step: reference[step] for step in range(5, 9)}
    assert parse_val_bpb(resumed)[8] == parse_val_bpb(mid_run)[8]


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size=300"], "--total-batch-size=300 must be a positive multiple of device_batch_size * max_seq_len * "
                                 "world_size = 4 * 64 * 1 = 256"),
    (["--resume-from-step=3"], "--resume-from-step=3: no complete checkpoint at"),
    (["--model-tag=never_trained"], "no base checkpoint in"),
])
def test_mid_train_bad_input_is_one_line_at_start_and_writes_nothing(chat_base_dir, flags, message):
    from scripts.mid_train import main

    code, out, _ = run_in_process(main, "mid_train", chat_base_dir, [*MID_FLAGS, "--model-tag=bad", "--num-iterations=2", *flags])
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
    code, out, _ = run_in_process(main, "mid_train", tmp_path, [*MID_FLAGS, "--model-tag=bad", "--num-iterations=2"])
    assert code == 2, out
    assert "identity_conversations.jsonl has 1 bad line(s) (first: line 2: a conversation needs at least 2 messages" in out
    assert not (tmp_path / "mid_checkpoints").exists()

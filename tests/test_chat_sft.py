"""
SFT: the one-conversation-per-row loader of nanochat.chat_data (targets are exactly the assistant
tokens of render_conversation's mask, rows padded to the longest of the batch, ranks disjoint), and
scripts/chat_sft.py end to end on CPU on the midtrained tiny model (the chat fixtures of conftest.py):
it lowers the loss, lists the mixture with what is missing, writes a checkpoint load_model("sft")
reads, resumes a run SIGKILLed after a save with identical losses, warm-starts the optimizer with its own LRs, and rejects bad
input at start.
"""

import os
import re
import shutil

import pytest
import torch

from conftest import SFT_FLAGS, SFT_STEP_LINE, kill_after_save_then_resume, parse_lines, run_in_process, script_environment
from nanochat.chat_data import padded_conversation_batches
VAL_LOSS_LINE = re.compile(r"^Step (\d{5}) \| Validation loss: ([0-9.]+)$")


def parse_sft_losses(output):
    return parse_lines(SFT_STEP_LINE, output)


def parse_val_loss(output):
    return parse_lines(VAL_LOSS_LINE, output, cast=float)


# -----------------------------------------------------------------------------
# The loader


def tool_conversations(n):
    """Multi-turn conversations, some with a calculator call whose output the model must not be trained on."""
    conversations = []
    for i in range(n):
        answer = f"a{i}" if i % 3 else [{"type": "text", "text": f"sum {i}: "}, {"type": "python", "text": f"{i}+1"},
                                         {"type": "python_output", "text": str(i + 1)}, {"type": "text", "text": f"is {i + 1}"}]
        messages = [{"role": "user", "content": f"q{i} " + "the cat sees the moon. " * (i % 4)},
                    {"role": "assistant", "content": answer}]
        if i % 2:
            messages += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "the end"}]
        conversations.append({"messages": messages})
    return conversations


def test_sft_targets_are_exactly_the_assistant_tokens_and_rows_pad_to_the_longest(tiny_tokenizer):
    dataset, max_tokens = tool_conversations(12), 40
    renders = [tiny_tokenizer.render_conversation(c, max_tokens=max_tokens) for c in dataset]
    pad = tiny_tokenizer.encode_special("<|assistant_end|>")
    for rank in (0, 1):
        loader = padded_conversation_batches(dataset, tiny_tokenizer, 3, max_tokens, rank=rank, world_size=2)
        for batch in range(2):
            inputs, targets, state = next(loader)
            indices = [rank + 2 * (3 * batch + row) for row in range(3)]  # rank r reads r, r+2, ...: ranks disjoint
            assert inputs.shape[1] == max(len(renders[i][0]) for i in indices) - 1
            for row, i in enumerate(indices):
                ids, mask = renders[i]
                n = len(ids) - 1
                assert inputs[row].tolist() == ids[:-1] + [pad] * (inputs.shape[1] - n)
                assert targets[row].tolist() == [ids[t + 1] if mask[t + 1] else -1 for t in range(n)] + [-1] * (inputs.shape[1] - n)
        assert state["cursor"] == rank + 12 and state["epoch"] == 1 or state["cursor"] == rank and state["epoch"] == 2
    # a python_output token is never a target, a python call is
    ids, mask = renders[0]
    assert 0 in mask[ids.index(tiny_tokenizer.encode_special("<|output_start|>")):][:2]
    assert mask[ids.index(tiny_tokenizer.encode_special("<|python_start|>"))] == 1


# -----------------------------------------------------------------------------
# scripts/chat_sft.py end to end


def test_chat_sft_lowers_the_loss_and_writes_a_checkpoint_load_model_reads(sft_run, chat_base_dir):
    from nanochat.checkpoint_manager import load_model

    assert sorted(parse_sft_losses(sft_run)) == list(range(8))
    val_loss = parse_val_loss(sft_run)
    assert set(val_loss) == {0, 4, 8}
    assert val_loss[8] < val_loss[4] < val_loss[0], val_loss
    assert "tok/sec: " in sft_run and "mfu: " in sft_run
    # the mixture: 20 ARC-Easy + 20 GSM8K + 60 SmolTalk + 30 identity + 300 + 300 spelling; ARC-Challenge is not there
    assert "Training mixture: 730 rows\n" in sft_run
    assert "  ARC-Challenge train: MISSING, left out (" in sft_run
    assert re.search(r"^Step 00004 \| mmlu_acc: [0-9.]+, arc_easy_acc: [0-9.]+$", sft_run, re.MULTILINE), sft_run
    report = (chat_base_dir / "report" / "chat-sft.md").read_text()
    assert "- Training rows: 730\n" in report and "- Number of iterations: 8\n" in report
    assert "ARC-Challenge train: MISSING" in report

    with script_environment(chat_base_dir):
        model, _, meta = load_model("sft", "cpu", phase="eval", model_tag="chat")
    assert meta["step"] == 8 and meta["source"] == "mid"
    assert meta["val_loss"] == pytest.approx(val_loss[8], abs=1e-6)


def test_chat_sft_killed_after_a_save_resumes_with_identical_losses(sft_run, chat_base_dir):
    shutil.copytree(chat_base_dir / "mid_checkpoints" / "chat", chat_base_dir / "mid_checkpoints" / "sft_killed")
    flags = [*SFT_FLAGS, "--model-tag=sft_killed", "--num-iterations=8", "--eval-every=4", "--save-every=4"]
    resumed = kill_after_save_then_resume("chat_sft", chat_base_dir, flags,
                                          chat_base_dir / "chatsft_checkpoints" / "sft_killed")
    reference = parse_sft_losses(sft_run)
    assert parse_sft_losses(resumed) == {step: reference[step] for step in range(4, 8)}
    assert parse_val_loss(resumed)[8] == parse_val_loss(sft_run)[8]


def test_load_optimizer_warm_starts_the_state_with_this_runs_learning_rates(mid_run, chat_base_dir):
    from nanochat.checkpoint_manager import load_model
    from nanochat.training import Runtime
    from nanochat.training import build_post_training_optimizer as build_optimizer
    from scripts.chat_sft import parse_args
    from nanochat.resume import warm_start_optimizer

    with script_environment(chat_base_dir):
        model, _, _ = load_model("mid", "cpu", phase="train", model_tag="chat")
        optimizer = build_optimizer(parse_args(["--init-lr-frac=0.02"]), model)
        fresh_lrs = [group["lr"] for group in optimizer.param_groups]
        runtime = Runtime("cpu", False, 0, 1, torch.device("cpu"), float("inf"))
        assert warm_start_optimizer(optimizer, "mid", runtime, model_tag="chat")
    saved = torch.load(chat_base_dir / "mid_checkpoints" / "chat" / "optim_000008_rank0.pt", weights_only=True)
    assert [group["lr"] for group in optimizer.param_groups] == fresh_lrs
    assert [group["lr"] for group in saved["param_groups"]] != fresh_lrs  # so the reset did something
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved_state in saved["state"].items():
        for name, value in saved_state.items():
            if torch.is_tensor(value):
                assert optimizer.state[params[int(index)]][name].equal(value), (index, name)


@pytest.mark.parametrize("flags, message", [
    (["--target-examples-per-step=6"], "--target-examples-per-step=6 must be a positive multiple of device_batch_size * "
                                       "world_size = 4 * 1 = 4"),
    (["--model-tag=bad"], "no mid checkpoint in"),
    (["--model-tag=chat", "--resume-from-step=3"], "--resume-from-step=3: no complete checkpoint at"),
])
def test_chat_sft_bad_input_is_one_line_at_start_and_writes_nothing(mid_run, chat_base_dir, flags, message):
    from scripts.chat_sft import main

    before = sorted(os.listdir(chat_base_dir / "chatsft_checkpoints" / "chat")) \
        if (chat_base_dir / "chatsft_checkpoints" / "chat").exists() else []
    code, out, _ = run_in_process(main, "chat_sft", chat_base_dir, [*SFT_FLAGS, "--num-iterations=2", *flags])
    assert code == 2, out
    error_lines = [line for line in out.splitlines() if line.startswith("chat_sft: ")]
    assert len(error_lines) == 1 and message in error_lines[0], out
    if "--model-tag=bad" in flags:
        assert "run `python -m scripts.mid_train` first" in error_lines[0]
    assert not (chat_base_dir / "chatsft_checkpoints" / "bad").exists()
    after = sorted(os.listdir(chat_base_dir / "chatsft_checkpoints" / "chat")) \
        if (chat_base_dir / "chatsft_checkpoints" / "chat").exists() else []
    assert after == before

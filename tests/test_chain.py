"""
The post-training chain as a user runs it, on one tiny model: base (conftest's 3-step d2 model)
-> mid (conftest's mid_run) -> SFT (conftest's sft_run, which trains on mid_run's checkpoint)
-> RL here, on that SFT checkpoint. Mid and SFT lowering their losses is asserted in
their own modules; here RL runs on the chain's end and logs its rewards, and chat_cli answers
from the checkpoint of every phase, the very answer that phase's model gives.
"""

import re

import torch

from conftest import run_in_process, script_environment
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine

RL_FLAGS = ["--device-type=cpu", "--model-tag=chat", "--examples-per-step=2", "--num-samples=2",
            "--device-batch-size=2", "--max-new-tokens=12", "--num-steps=2", "--eval-every=-1", "--save-every=-1"]
RL_STEP_LINE = re.compile(r"^Step (\d+)/\d+ \| Average reward: ([0-9.]+) \|")
PROMPT = "What does the cat see?"


def greedy_answer(phase):
    """The phase's model, loaded directly, answering PROMPT greedily as chat_cli frames a first turn."""
    model, tokenizer, _ = load_model(phase, "cpu", phase="eval", model_tag="chat")
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    tokens = [bos, tokenizer.encode_special("<|user_start|>"), *tokenizer.encode(PROMPT),
              tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|assistant_start|>")]
    answer = []
    with torch.no_grad():
        room = min(256, model.rotary_seq_len - len(tokens))  # chat_cli's cap on an answer
        for column, _ in Engine(model, tokenizer).generate(tokens, num_samples=1, max_tokens=room, temperature=0.0):
            if column[0] in (end, bos):
                break
            answer.append(column[0])
    return tokenizer.decode(answer)


def test_rl_runs_on_the_chains_sft_model_and_chat_cli_answers_from_every_phase(sft_run, chat_base_dir):
    from scripts.chat_cli import main as chat_cli_main
    from scripts.chat_rl import main as chat_rl_main

    code, rl_out, err = run_in_process(chat_rl_main, "chat_rl", chat_base_dir, RL_FLAGS)
    assert code == 0, rl_out + err
    rewards = {int(m.group(1)): float(m.group(2)) for m in map(RL_STEP_LINE.match, rl_out.splitlines()) if m}
    assert sorted(rewards) == [0, 1] and all(0.0 <= r <= 1.0 for r in rewards.values()), rl_out
    assert (chat_base_dir / "chatrl_checkpoints" / "chat" / "meta_000001.json").exists()

    for phase in ("base", "mid", "sft", "rl"):
        code, out, _ = run_in_process(chat_cli_main, "chat_cli", chat_base_dir,
                                      ["-i", phase, "-g", "chat", "-t", "0", "--device-type", "cpu", "-p", PROMPT])
        assert code == 0, (phase, out)
        with script_environment(chat_base_dir):
            expected = greedy_answer(phase)
        assert out.split("Assistant: ", 1)[1].rstrip("\n") == expected, phase

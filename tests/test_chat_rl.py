"""
scripts/chat_rl.py on CPU. The update's math on hand examples (advantages, which tokens train, the
per-token weights and the parameter gradients against a plain log-softmax reference), then whole
runs on a tiny real checkpoint and a tiny GSM8K copy: rewards are logged, the checkpoint loads with
load_model("rl"), a run SIGKILLed after a save resumes and repeats the uninterrupted one exactly, bad input is one line.

The policy of the runs is the tiny base checkpoint turned into a bigram model (the blocks' output
projections zeroed, so each next token depends only on the current one) that answers
"####... 5" or "####... 7" after <|assistant_start|>: its rewards vary within a question, so the
advantages and gradients are non-zero and the runs really train.
"""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VOCAB_SIZE, build_gpt, child_env, kill_once_saved, run_in_process, run_torchrun
from nanochat.gpt import GPTConfig
from scripts.chat_rl import advantages_from_rewards, policy_gradient_loss, rollout_seed, rollout_tensors
from scripts.chat_rl import main as chat_rl_main

TAG = "rl_policy"
RUN_FLAGS = [
    "--device-type=cpu", f"--model-tag={TAG}", "--examples-per-step=2", "--num-samples=4", "--device-batch-size=2",
    "--max-new-tokens=16", "--eval-every=2", "--eval-examples=3", "--save-every=1",
]
NUM_TRAIN, NUM_STEPS = 8, 4  # 8 problems // 2 per step
PASS_LINE = re.compile(r"^Step (\d+)/\d+ \| Example step (\d+) \| Pass (\d+) \| loss: (-?[0-9.]+) \| Average reward: ([0-9.]+)$")
STEP_LINE = re.compile(r"^Step (\d+)/\d+ \| Average reward: ([0-9.]+) \| Average sequence length: ([0-9.]+) \| .*tok/sec: [0-9,]+")
PASSK_LINE = re.compile(r"^Step (\d+) \| Pass@1: ([0-9.]+), Pass@2: ([0-9.]+)$")


# -----------------------------------------------------------------------------
# The update on hand examples


def test_advantages_are_rewards_minus_their_mean():
    assert advantages_from_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert advantages_from_rewards(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_rollout_seeds_are_fixed_non_negative_31_bit_numbers():
    assert rollout_seed(3, 17) == hash((3, 17, 0)) & 0x7FFFFFFF
    seeds = {rollout_seed(step, example) for step in range(4) for example in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)


def hand_rollouts(tokenizer):
    """
    Two samples of one prompt as the Engine returns them. The first calls the calculator: the
    tool's output (<|output_start|> 2 <|output_end|>) is forced, mask 0. The second is shorter and
    gets padded.
    """
    special = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode("one plus one"),
              special("<|user_end|>"), special("<|assistant_start|>")]
    a, b, one, plus, two = (tokenizer.encode(ch)[0] for ch in "ab1+2")
    first = [a, special("<|python_start|>"), one, plus, one, special("<|python_end|>"),
             special("<|output_start|>"), two, special("<|output_end|>"), b]
    first_mask = [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    second, second_mask = [b, a], [1, 1]
    sequences = [prompt + first, prompt + second]
    masks = [[0] * len(prompt) + first_mask, [0] * len(prompt) + second_mask]
    return prompt, sequences, masks


def test_targets_keep_only_sampled_tokens(tiny_tokenizer):
    prompt, sequences, masks = hand_rollouts(tiny_tokenizer)
    pad = tiny_tokenizer.encode_special("<|assistant_end|>")
    inputs, targets = rollout_tensors(sequences, masks, pad)
    longest = len(sequences[0])
    assert inputs.shape == targets.shape == (2, longest - 1)
    assert inputs[0].tolist() == sequences[0][:-1]
    assert inputs[1].tolist() == (sequences[1] + [pad] * (longest - len(sequences[1])))[:-1]
    # target t predicts token t+1: it is trained on only when token t+1 was sampled
    P = len(prompt)
    expected_first = [-1] * (P - 1) + sequences[0][P:P + 6] + [-1, -1, -1] + [sequences[0][-1]]
    expected_second = [-1] * (P - 1) + sequences[1][P:] + [-1] * (longest - len(sequences[1]))
    assert targets.tolist() == [expected_first, expected_second]


def test_only_sampled_tokens_get_gradient_weighted_by_their_rows_advantage(tiny_tokenizer):
    prompt, sequences, masks = hand_rollouts(tiny_tokenizer)
    inputs, targets = rollout_tensors(sequences, masks, tiny_tokenizer.encode_special("<|assistant_end|>"))
    advantages = advantages_from_rewards(torch.tensor([1.0, 0.0]))  # [0.5, -0.5]
    normalizer = 3  # e.g. 1 pass per question x 3 questions on this rank
    num_trained = 7 + 2  # sampled answer tokens after the first: 6 + 1 in row 0, 2 in row 1
    assert int((targets >= 0).sum()) == num_trained

    # d loss / d log p(token): -advantage / (trained tokens x normalizer) where trained, exactly 0 elsewhere
    token_log_probs = torch.randn(targets.shape, requires_grad=True)
    policy_gradient_loss(token_log_probs, targets, advantages, normalizer).backward()
    expected_weights = torch.where(targets >= 0, -advantages.unsqueeze(-1) / (num_trained * normalizer), 0.0)
    assert torch.equal(token_log_probs.grad, expected_weights)

    # the same on a real model: its parameter gradients equal those of the explicit weighted sum
    config = GPTConfig(sequence_len=64, vocab_size=TINY_VOCAB_SIZE, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_gpt(config, seed=0, perturb=0.02).train()
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
    policy_gradient_loss(logp, targets, advantages, normalizer).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference_logp = F.log_softmax(model(inputs), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (reference_logp * expected_weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert grads["lm_head.weight"].abs().sum() > 0

    # equal rewards: no advantage, no gradient at all
    model.zero_grad(set_to_none=True)
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
    policy_gradient_loss(logp, targets, advantages_from_rewards(torch.ones(2)), normalizer).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# -----------------------------------------------------------------------------
# Whole runs on a tiny checkpoint and a tiny GSM8K copy

def gsm8k_rows(count, offset):
    rows = []
    for i in range(count):
        answer = 5 if (i + offset) % 2 == 0 else 7
        rows.append({"question": f"What is {answer - 2} plus 2?", "answer": f"{answer - 2} plus 2 is <<{answer - 2}+2={answer}>>{answer}.\n#### {answer}"})
    return rows


def write_gsm8k_split(base, split, rows, substitute=None):
    """A split as tasks.hub loads it (and the offline builder writes it): shards, provenance, manifest last."""
    directory = base / "task_data" / "openai--gsm8k" / "main" / split
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "00000.parquet")
    if substitute:
        (directory / "provenance.json").write_text(json.dumps({"substitute": substitute}))
    (directory / "manifest.json").write_text(json.dumps(["00000.parquet"]))


def bigram_answering_policy(model_data, tokenizer):
    """
    The weights with every block's output projection zeroed (the residual stream is then the
    token's own embedding) and a bigram table in wte/lm_head: <|assistant_start|> -> '#',
    '#' -> '#' (p ~ .85) or ' ', ' ' -> '5' or '7', digit -> <|assistant_end|>.
    """
    byte = {ch: tokenizer.encode(ch) for ch in "# 57"}
    assert all(len(ids) == 1 for ids in byte.values()), byte
    start, hash_, space, five, seven = (tokenizer.encode_special("<|assistant_start|>"), byte["#"][0], byte[" "][0],
                                        byte["5"][0], byte["7"][0])
    end = tokenizer.encode_special("<|assistant_end|>")
    for key in model_data:
        if key.endswith("attn.c_proj.weight") or key.endswith("mlp.c_proj.weight"):
            model_data[key] = torch.zeros_like(model_data[key])
    wte, lm_head = model_data["transformer.wte.weight"].clone(), torch.zeros_like(model_data["lm_head.weight"])
    dim = wte.size(1)
    for slot, token in enumerate([start, hash_, space, five, seven]):
        wte[token] = 0.0
        wte[token, slot] = 1.0  # rms-normalized to sqrt(dim) in the forward pass
    scale = 1 / dim ** 0.5
    logits = {(0, hash_): 12.0, (1, hash_): 15.6, (1, space): 12.0, (2, five): 12.0, (2, seven): 12.0,
              (3, end): 12.0, (4, end): 12.0}
    for (slot, token), logit in logits.items():
        lm_head[token, slot] = logit * scale
    model_data["transformer.wte.weight"], model_data["lm_head.weight"] = wte, lm_head
    return model_data


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory, tiny_base_dir, tiny_checkpoint):
    """A base dir with the tokenizer, an SFT checkpoint (the bigram policy) and GSM8K train/test copies."""
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint, save_checkpoint
    from nanochat.tokenizer import RustBPETokenizer

    base = tmp_path_factory.mktemp("chat_rl")
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    tokenizer = RustBPETokenizer.from_directory(str(base / "tokenizer"))
    source_dir = str(tiny_base_dir / "base_checkpoints" / "for_loss")
    model_data, _, meta = load_checkpoint(source_dir, find_last_step(source_dir), "cpu")
    policy = bigram_answering_policy(model_data, tokenizer)
    save_checkpoint(str(base / "chatsft_checkpoints" / TAG), 0, policy, None, {"step": 0, "model_config": meta["model_config"]})
    write_gsm8k_split(base, "train", gsm8k_rows(NUM_TRAIN, 0), substitute="test problems standing in for train")
    write_gsm8k_split(base, "test", gsm8k_rows(3, 1))
    return base


def run_chat_rl(base, *flags):
    """chat_rl's main in this process; returns its stdout."""
    code, out, err = run_in_process(chat_rl_main, "chat_rl", base, [*RUN_FLAGS, *flags])
    assert code == 0, out + err
    return out


def parse_run(output):
    passes = {(int(m[1]), int(m[2]), int(m[3])): (m[4], m[5]) for m in map(PASS_LINE.match, output.splitlines()) if m}
    steps = {int(m[1]): (m[2], m[3]) for m in map(STEP_LINE.match, output.splitlines()) if m}
    pass_at_k = {int(m[1]): (float(m[2]), float(m[3])) for m in map(PASSK_LINE.match, output.splitlines()) if m}
    return passes, steps, pass_at_k


@pytest.fixture(scope="module")
def first_run(rl_base):
    """The uninterrupted run (steps 0..3, a save after each from step 1); its stdout and its final weights."""
    stdout = run_chat_rl(rl_base)
    final = rl_base / "chatrl_checkpoints" / TAG / "model_000003.pt"
    return stdout, torch.load(final, weights_only=True)


def test_tiny_run_logs_rewards_evaluates_and_saves_a_checkpoint_load_model_reads(rl_base, first_run, monkeypatch):
    stdout, final_weights = first_run
    passes, steps, pass_at_k = parse_run(stdout)
    # 2 questions per step x 4 samples in passes of 2 rows
    assert sorted(steps) == list(range(NUM_STEPS))
    assert sorted(passes) == [(s, e, p) for s in range(NUM_STEPS) for e in range(2) for p in range(2)]
    rewards = [float(r) for _, r in passes.values()]
    assert all(r in (0.0, 0.5, 1.0) for r in rewards) and 0.0 < sum(rewards) / len(rewards) < 1.0, rewards
    for step in range(NUM_STEPS):  # the step's mean reward is the mean over its questions' samples
        step_rewards = [float(passes[(step, e, p)][1]) for e in range(2) for p in range(2)]
        assert float(steps[step][0]) == pytest.approx(sum(step_rewards) / 4)
    assert sorted(pass_at_k) == [0, 2] and all(p1 <= p2 for p1, p2 in pass_at_k.values())
    # the offline substitute is named once, when the train split loads
    assert stdout.count("openai/gsm8k main/train: offline substitute, not the hub's data") == 1

    checkpoint_dir = rl_base / "chatrl_checkpoints" / TAG
    assert sorted(p.name for p in checkpoint_dir.glob("model_*.pt")) == [f"model_00000{s}.pt" for s in (1, 2, 3)]
    assert (checkpoint_dir / "optim_000003_rank0.pt").exists()
    meta = json.loads((checkpoint_dir / "meta_000003.json").read_text())
    assert meta["num_steps"] == NUM_STEPS and meta["loop_state"]["example_position"] == 2 * NUM_STEPS
    report = (rl_base / "report" / "chat-rl.md").read_text()
    assert "## Chat RL" in report and "offline substitute: test problems standing in for train" in report

    from nanochat.checkpoint_manager import load_model

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(rl_base))
    model, _, loaded_meta = load_model("rl", "cpu", phase="eval", model_tag=TAG)
    assert loaded_meta["step"] == 3
    assert all(torch.equal(final_weights[k], v) for k, v in model.state_dict().items())
    # RL moved the weights away from the source policy
    source = torch.load(rl_base / "chatsft_checkpoints" / TAG / "model_000000.pt", weights_only=True)
    assert not torch.equal(source["lm_head.weight"], final_weights["lm_head.weight"])


def test_a_run_killed_after_a_save_resumes_and_repeats_the_uninterrupted_run_exactly(rl_base, first_run):
    stdout, final_weights = first_run
    shutil.copytree(rl_base / "chatsft_checkpoints" / TAG, rl_base / "chatsft_checkpoints" / "rl_killed")
    kill_once_saved(["-m", "scripts.chat_rl", *RUN_FLAGS, "--model-tag=rl_killed"], child_env(rl_base),
                    rl_base / "chatrl_checkpoints" / "rl_killed" / "meta_000001.json")
    assert not (rl_base / "chatrl_checkpoints" / "rl_killed" / "model_000003.pt").exists()

    resumed = run_chat_rl(rl_base, "--model-tag=rl_killed", "--resume-from-step=1")
    passes, steps, _ = parse_run(stdout)
    resumed_passes, resumed_steps, _ = parse_run(resumed)
    assert sorted(resumed_steps) == [2, 3]
    assert resumed_steps == {step: steps[step] for step in (2, 3)}
    assert resumed_passes == {key: value for key, value in passes.items() if key[0] >= 2}  # rewards and losses
    assert any(float(loss) != 0 for loss, _ in resumed_passes.values())  # some question had rewards to learn from
    weights = torch.load(rl_base / "chatrl_checkpoints" / "rl_killed" / "model_000003.pt", weights_only=True)
    assert all(torch.equal(weights[k], final_weights[k]) for k in final_weights)


def test_two_ranks_split_each_step(rl_base, first_run, tmp_path):
    """Rank r takes question r of each step; the optimizer averages the gradients over the ranks."""
    stdout, _ = first_run
    base = tmp_path / "two_ranks"
    for name in ("tokenizer", "chatsft_checkpoints", "task_data"):
        shutil.copytree(rl_base / name, base / name)
    two = run_torchrun(["-m", "scripts.chat_rl", "--", *RUN_FLAGS, "--eval-every=-1"], child_env(base))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    passes, steps, _ = parse_run(stdout)
    two_passes, two_steps, _ = parse_run(two.stdout)
    assert two_steps == steps  # mean reward and length over both ranks: the same samples as on one rank
    # rank 0 prints its one question per step, the first one of the 1-rank run; with half the
    # questions per rank its loss is divided by 1 question instead of 2
    assert sorted(two_passes) == [(s, 0, p) for s in range(NUM_STEPS) for p in range(2)]
    for (step, _, p), (loss, reward) in two_passes.items():
        one_loss, one_reward = passes[(step, 0, p)]
        assert reward == one_reward and float(loss) == pytest.approx(2 * float(one_loss), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--source=mid"], "no mid checkpoint in {base}/mid_checkpoints/rl_policy: run `python -m scripts.mid_train` first"),
    (["--num-samples=3"], "--num-samples=3 must be a multiple of --device-batch-size=2"),
    (["--resume-from-step=0"], "--resume-from-step=0: no complete checkpoint at {base}/chatrl_checkpoints/rl_policy/meta_000000.json"),
    (["--examples-per-step=9"], "GSM8K train has 8 problems, fewer than --examples-per-step=9"),
])
def test_bad_input_is_one_line_at_start(rl_base, flags, message):
    checkpoints = rl_base / "chatrl_checkpoints"
    before = sorted(checkpoints.rglob("*")) if checkpoints.exists() else []
    code, out, err = run_in_process(chat_rl_main, "chat_rl", rl_base, [*RUN_FLAGS, *flags])
    assert code == 2, out + err
    error_lines = [line for line in out.splitlines() if line.startswith("chat_rl: ")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"chat_rl: {message.format(base=rl_base)}"), out
    assert (sorted(checkpoints.rglob("*")) if checkpoints.exists() else []) == before

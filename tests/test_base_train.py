"""
End-to-end tests of scripts/base_train.py on CPU with a tiny model: it learns, it writes a
checkpoint that load_model reads, bad flags fail at start with a useful message, and a run killed
with SIGKILL and resumed from its last checkpoint continues with exactly the same losses.
Also scripts/base_loss.py on the model trained here: its bpb, report section and error messages.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (
    REPO_ROOT, TINY_FLAGS, child_env, default_shard_dir, kill_once_saved, parse_losses, parse_val_bpb, run_base_train,
    run_in_process,
)
from nanochat.gpt import GPT, UPSTREAM_CONFIG_FIELDS, GPTConfig
from scripts.base_loss import main as base_loss_main
from scripts.base_train import main as base_train_main
from nanochat.training_plan import auto_total_batch_size, scaling_params
from scripts.base_train import model_config_for_args, parse_args


@pytest.fixture
def base_dir(tiny_base_dir):
    """The session's tiny base dir: shards and a trained tokenizer (tests/conftest.py)."""
    return tiny_base_dir


def test_tiny_run_lowers_loss_and_writes_a_loadable_checkpoint(base_dir):
    result = run_base_train(base_dir, "--num-iterations=30", "--model-tag=learns")
    assert result.returncode == 0, result.stdout + result.stderr
    val_bpb = parse_val_bpb(result.stdout)
    assert set(val_bpb) == {0, 10, 20, 30}
    # Tiny batches scale the LRs by sqrt(256 / 2^19), so learning is slow but steady.
    assert val_bpb[0] > val_bpb[10] > val_bpb[20] > val_bpb[30], val_bpb
    assert val_bpb[30] < 0.95 * val_bpb[0], val_bpb
    losses = parse_losses(result.stdout)
    assert sorted(losses) == list(range(30))
    assert "Using user-provided number of iterations: 30" in result.stdout
    assert f"Minimum validation bpb: {min(val_bpb.values()):.6f}" in result.stdout

    # the report section carries upstream's field names
    report = (base_dir / "report" / "base-model-training.md").read_text()
    for field in ["Number of parameters", "Number of FLOPs per token", "Calculated number of iterations",
                  "Number of training tokens", "Tokens : Scaling params ratio", "DDP world size", "warmup_ratio",
                  "warmdown_ratio", "final_lr_frac", "Minimum validation bpb", "Final validation bpb",
                  "CORE metric estimate", "MFU %", "Total training flops", "Total training time", "Peak memory usage"]:
        assert f"\n- {field}: " in report, field
    assert "- Calculated number of iterations: 30\n" in report
    final_bpb = re.search(r"^- Final validation bpb: ([0-9.]+)$", report, re.MULTILINE).group(1)
    assert float(final_bpb) == pytest.approx(val_bpb[30], abs=1e-4)

    code = (
        "import torch\n"
        "from nanochat.checkpoint_manager import load_model\n"
        "model, tokenizer, meta = load_model('base', 'cpu', phase='eval', model_tag='learns')\n"
        "ids = torch.tensor([tokenizer.encode('the cat sees the moon.', prepend='<|bos|>')])\n"
        "logits = model(ids)\n"
        "print(meta['step'], tuple(logits.shape), bool(torch.isfinite(logits).all()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env(base_dir), capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    step, rest = loaded.stdout.strip().splitlines()[-1].split(" ", 1)
    assert step == "30"
    assert rest.endswith("True")


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size=300", "--num-iterations=2"], "must be a positive multiple of device_batch_size * max_seq_len * world_size"),
    (["--head-dim=63", "--num-iterations=2"], "--head-dim must be a positive even number"),
    (["--depth=0", "--num-iterations=2"], "--depth must be >= 1"),
    (["--num-iterations=-1", "--target-param-data-ratio=-1"], "no training horizon"),
    (["--eval-tokens=10", "--num-iterations=2"], "--eval-tokens=10 is less than one evaluation batch"),
    (["--max-seq-len=0", "--num-iterations=2"], "--max-seq-len must be >= 1"),
    # resuming past the horizon would loop forever (the loop ends when step == num_iterations)
    (["--num-iterations=2", "--resume-from-step=5"], "--resume-from-step=5 is past the end of this run (2 steps)"),
])
def test_bad_config_fails_at_start_with_a_message(base_dir, flags, message, monkeypatch, capsys):
    code, out, err = run_in_process(base_train_main, "base_train", base_dir, [*TINY_FLAGS, *flags, "--model-tag=bad"])
    assert code == 2  # and no traceback: any other exception would have failed the test
    assert message in out + err
    assert not (base_dir / "base_checkpoints" / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("device_flag, message", [
    ("--device-type=cuda", "--device-type cuda was requested but torch sees no CUDA device; pass --device-type cpu"),
    ("--device-type=tpu", "--device-type must be cuda, mps or cpu, got 'tpu'"),
])
def test_unavailable_device_fails_at_start_with_a_message(base_dir, device_flag, message, monkeypatch, capsys):
    code, out, _ = run_in_process(base_train_main, "base_train", base_dir,
                                  [*TINY_FLAGS, "--num-iterations=2", device_flag, "--model-tag=bad_device"])
    assert code == 2
    assert f"base_train: {message}\n" in out


def test_single_step_run_without_evaluation_still_saves_the_last_step(base_dir):
    """--eval-every=-1 skips every evaluation, the last step included; a 1-step horizon with no warmdown divides by nothing."""
    args = parse_args(TINY_FLAGS)
    config, _ = model_config_for_args(args, 512)  # tok_train made a 512-token vocab
    with torch.device("meta"):
        params = scaling_params(GPT(config))
    ratio = 300 / params  # 300 tokens of data: one step of 256 tokens
    result = run_base_train(base_dir, "--num-iterations=-1", f"--target-param-data-ratio={ratio}", "--eval-every=-1",
                            "--warmdown-ratio=0", "--model-tag=one_step")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Calculated number of iterations from target data:param ratio: 1\n" in result.stdout
    assert sorted(parse_losses(result.stdout)) == [0]
    assert "Attention: sdpa (no CUDA device)\n" in result.stdout  # the backend, at start and on the first step line
    assert next(line for line in result.stdout.splitlines() if line.startswith("step 00000")).endswith("| attention: sdpa")
    assert "Validation bpb" not in result.stdout and "Minimum validation bpb" not in result.stdout
    meta = json.loads((base_dir / "base_checkpoints" / "one_step" / "meta_000001.json").read_text())
    assert meta["step"] == 1 and meta["val_bpb"] is None
    assert meta["loop_state"]["min_val_bpb"] == float("inf")


def test_resume_from_missing_step_names_the_checkpoint(base_dir, monkeypatch, capsys):
    code, out, err = run_in_process(base_train_main, "base_train", base_dir,
                                    [*TINY_FLAGS, "--num-iterations=4", "--model-tag=never_saved", "--resume-from-step=3"])
    assert code != 0
    assert "never_saved" in out + err


def test_resume_after_kill_gives_identical_losses(base_dir):
    flags = ["--num-iterations=16", "--save-every=4"]
    reference = run_base_train(base_dir, *flags, "--model-tag=uninterrupted")
    assert reference.returncode == 0, reference.stderr
    reference_losses = parse_losses(reference.stdout)

    # Second run, keeping one checkpoint: SIGKILLed once its step-8 checkpoint is complete.
    killed_dir = base_dir / "base_checkpoints" / "killed"
    kill_once_saved(["-m", "scripts.base_train", *TINY_FLAGS, *flags, "--model-tag=killed", "--keep-checkpoints=1"],
                    child_env(base_dir), killed_dir / "meta_000008.json")
    assert not (killed_dir / "model_000016.pt").exists()

    resumed = run_base_train(base_dir, *flags, "--model-tag=killed", "--resume-from-step=8", "--keep-checkpoints=1")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(os.listdir(killed_dir)) == ["meta_000016.json", "model_000016.pt", "optim_000016_rank0.pt", "summary.json"]
    meta = json.loads((killed_dir / "meta_000016.json").read_text())
    assert GPTConfig(**meta["model_config"], **meta["model_options"]).recipe() == "2026-07"  # the default recipe
    resumed_losses = parse_losses(resumed.stdout)
    assert sorted(resumed_losses) == list(range(8, 16))
    for step in range(8, 16):
        assert resumed_losses[step] == reference_losses[step], (step, resumed_losses[step], reference_losses[step])
    assert parse_val_bpb(resumed.stdout)[16] == parse_val_bpb(reference.stdout)[16]


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank(base_dir):
    flags = ["--total-batch-size=512", "--num-iterations=8", "--save-every=4", "--model-tag=two_ranks"]
    two = run_base_train(base_dir, *flags, nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    checkpoint_dir = base_dir / "base_checkpoints" / "two_ranks"
    assert (checkpoint_dir / "optim_000004_rank0.pt").exists() and (checkpoint_dir / "optim_000004_rank1.pt").exists()
    two_losses = parse_losses(two.stdout)

    one = run_base_train(base_dir, *[f for f in flags if not f.startswith("--model-tag")], "--model-tag=two_ranks",
                         "--resume-from-step=4")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    one_losses = parse_losses(one.stdout)
    assert sorted(one_losses) == list(range(4, 8))
    # Same weights and optimizer state, different (approximately resumed) data order: the loss
    # continues where the 2-rank run was, not from scratch.
    for step in range(4, 8):
        assert abs(float(one_losses[step]) - float(two_losses[step])) < 0.05 * float(two_losses[step])


@pytest.fixture
def trained_for_loss(tiny_checkpoint):
    """A 3-step model under the tag for_loss; returns base_train's stdout."""
    return tiny_checkpoint


def run_base_loss(base, *flags):
    cmd = [sys.executable, "-m", "scripts.base_loss", "--device-type=cpu", *flags]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(base), capture_output=True, text=True, timeout=300)


def test_base_loss_reports_bpb_of_the_trained_model(base_dir, trained_for_loss):
    result = run_base_loss(base_dir, "--device-batch-size=4", "--split-tokens=512", "--model-tag=for_loss")
    assert result.returncode == 0, result.stdout + result.stderr
    bpb = dict(re.findall(r"^(train|val) bpb: ([0-9.]+)$", result.stdout, re.MULTILINE))
    assert set(bpb) == {"train", "val"}
    # the val bpb base_train printed at its last step used 512 tokens from the same loader
    assert float(bpb["val"]) == pytest.approx(parse_val_bpb(trained_for_loss)[3], abs=1e-4)
    assert "The capital of France is" in result.stdout

    # report: model and both bpb, the 7 greedy completions, the 8 unconditioned samples, as upstream's base_loss
    report = (base_dir / "report" / "base-model-loss.md").read_text()
    fields = [line[2:].split(":", 1)[0] for line in report.splitlines() if line.startswith("- ")]
    assert fields[:3] == ["model", "train bpb", "val bpb"]
    assert fields[3:] == [f"sample {i}" for i in range(7)] + [f"unconditioned {i}" for i in range(8)]
    assert "- model: base_model (step 3)\n" in report


@pytest.mark.parametrize("flags, message", [
    # 4 rows of 64 tokens per step: 300 is not a whole number of steps
    (["--device-batch-size=4", "--split-tokens=300", "--model-tag=for_loss"],
     "--split-tokens=300 must be a positive multiple of device_batch_size * sequence_len * world_size = 4 * 64 * 1 = 256; "
     "e.g. --split-tokens=256"),
    (["--device-batch-size=4", "--split-tokens=512", "--model-tag=never_trained"], "no base checkpoint in"),
    # the hub is unreachable in tests (HF_HUB_OFFLINE=1): missing transformers or a missing model, said plainly
    (["--device-batch-size=4", "--split-tokens=512", "--hf-path=openai-community/gpt2"], "--hf-path=openai-community/gpt2"),
])
def test_base_loss_bad_input_fails_with_a_message(base_dir, trained_for_loss, flags, message, monkeypatch, capsys):
    from scripts.base_loss import main as base_loss_main

    code, out, err = run_in_process(base_loss_main, "base_loss", base_dir, ["--device-type=cpu", *flags])
    assert code == 2, out + err
    assert message in out


# -----------------------------------------------------------------------------
# The pretraining dataset


def test_base_train_reads_the_chosen_dataset_and_records_it(base_dir, tmp_path):
    """
    --dataset fineweb reads base_data/ (val = shard_01822) and is recorded in the checkpoint and
    the report; the default (ClimbMix) then finds no shards of its own, and resuming that run on
    another dataset is refused.
    """
    base = tmp_path / "base"
    shutil.copytree(base_dir / "tokenizer", base / "tokenizer")
    (base / "base_data").mkdir()
    for shard in default_shard_dir(base_dir).iterdir():  # the session's ClimbMix shards, renamed into FineWeb-Edu's layout
        shutil.copy(shard, base / "base_data" / ("shard_01822.parquet" if shard.name == "shard_06542.parquet" else shard.name))
    flags = [*TINY_FLAGS, "--num-iterations=2", "--model-tag=fw"]
    code, out, err = run_in_process(base_train_main, "base_train", base, [*flags, "--dataset=fineweb"])
    assert code == 0, out + err
    assert "Pretraining data: FineWeb-Edu-100B" in out and set(parse_val_bpb(out)) == {0, 2}
    meta = json.loads((base / "base_checkpoints" / "fw" / "meta_000002.json").read_text())
    assert meta["user_config"]["dataset"] == "fineweb"
    assert "\n- dataset: fineweb\n" in (base / "report" / "base-model-training.md").read_text()

    code, out, _ = run_in_process(base_train_main, "base_train", base, [*TINY_FLAGS, "--num-iterations=2", "--model-tag=cm"])
    assert code == 2 and f"base_train: no ClimbMix-400B train shards in {base / 'base_data_climbmix'}: " in out
    assert "python -m nanochat.dataset --dataset climbmix -n 8" in out and "set NANOCHAT_DATASET=fineweb" in out
    code, out, _ = run_in_process(base_train_main, "base_train", base, [*flags, "--resume-from-step=2"])
    assert code == 2 and "trained on fineweb, not climbmix: resume with --dataset fineweb" in out
    # base_loss measures on the data the checkpoint names, whatever $NANOCHAT_DATASET says
    code, out, err = run_in_process(base_loss_main, "base_loss", base,
                                    ["--device-type=cpu", "--device-batch-size=4", "--split-tokens=256", "--model-tag=fw"])
    assert code == 0 and "Data: FineWeb-Edu-100B" in out, out + err


# -----------------------------------------------------------------------------
# The derived hyperparameters (pure functions of the flags; no training)


def test_auto_batch_size_follows_the_power_lines_rule():
    """--total-batch-size=-1: 2^round(log2(2^19 * (D/D_ref)^0.383)) with D_ref at d12 (Power Lines, as later upstream)."""
    expected = {8: 2**18, 10: 2**19, 12: 2**19, 16: 2**19, 18: 2**20, 20: 2**20, 26: 2**20, 32: 2**21}
    for depth, batch in expected.items():
        args = parse_args([f"--depth={depth}", "--total-batch-size=-1"])
        config, _ = model_config_for_args(args, 32768)
        with torch.device("meta"):
            params = scaling_params(GPT(config))
        assert auto_total_batch_size(args, params, 32768)[0] == batch, depth


def test_the_2026_01_recipe_trains_the_old_model_and_saves_upstreams_meta(base_dir):
    result = run_base_train(base_dir, "--recipe=2026-01", "--num-iterations=2", "--eval-every=-1", "--model-tag=old_recipe")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Recipe: 2026-01\n" in result.stdout and "Optimizer recipe: 2026-01" in result.stdout
    meta = json.loads((base_dir / "base_checkpoints" / "old_recipe" / "meta_000002.json").read_text())
    assert set(meta["model_config"]) == set(UPSTREAM_CONFIG_FIELDS)  # what upstream's GPTConfig(**model_config) takes
    assert GPTConfig(**meta["model_config"], **meta["model_options"]).recipe() == "2026-01"
    weights = torch.load(base_dir / "base_checkpoints" / "old_recipe" / "model_000002.pt", weights_only=True)
    assert "smear_gate.weight" not in weights


def test_shared_adam_betas_are_refused_under_the_2026_07_recipe(base_dir):
    code, out, err = run_in_process(base_train_main, "base_train", base_dir, [*TINY_FLAGS, "--num-iterations=2",
                                                                            "--adam-beta1=0.9", "--model-tag=bad_betas"])
    assert code == 2 and "--adam-beta1/--adam-beta2 set the shared AdamW betas of recipe 2026-01" in out, out + err

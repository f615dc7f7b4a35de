"""
The pipeline scripts on CPU: base_train's run summary and its CORE flag, miniseries.sh and
scaling_laws.sh in their tiny mode (CSV rows filled from the summary, a second run skips what is
done), the skip/resume rules of dev/phase_lib.sh on fake phase outputs (a phase killed after a
checkpoint resumes from it) and speedrun.sh's plan in its dry-run mode, and shellcheck on every .sh.
"""

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO_ROOT, TINY_FLAGS, child_env, default_shard_dir, fake_nvidia_smi, free_port, run_in_process, small_bundle
from nanochat.gpt import GPT, GPTConfig
from nanochat.run_summary import CSV_COLUMNS, history_before

CORE_AVAILABLE = importlib.util.find_spec("nanochat.core_eval") is not None
VAL_LINE = re.compile(r"^Step (\d{5}) \| Validation bpb: ([0-9.]+)$", re.MULTILINE)


def write_tiny_eval_bundle(base):
    """A two-task CORE bundle (language modeling, multiple choice) in the bundle's layout."""
    bundle = base / "eval_bundle"
    (bundle / "eval_data" / "tiny").mkdir(parents=True)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: tiny_lm\n  dataset_uri: tiny/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"
        "- label: tiny_mc\n  dataset_uri: tiny/mc.jsonl\n  num_fewshot: [1]\n  icl_task_type: multiple_choice\n"
        "  continuation_delimiter: \"\\nAnswer: \"\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntiny_lm,0\ntiny_mc,50\n")
    subjects, objects = ["the cat", "a dog", "my teacher", "the river"], ["the moon.", "a red house.", "many stars."]
    with open(bundle / "eval_data" / "tiny" / "lm.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"context": f"{subjects[i % 4]} sees", "continuation": objects[i % 3]}) + "\n")
    with open(bundle / "eval_data" / "tiny" / "mc.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"query": f"{subjects[i % 4]} sees", "choices": [objects[i % 3], "loves"], "gold": 0}) + "\n")


@pytest.fixture(scope="module")
def series_base(tiny_base_dir, tmp_path_factory):
    """A base dir of its own (the session's shards and tokenizer, linked) plus a tiny CORE bundle."""
    base = tmp_path_factory.mktemp("series")
    default_shard_dir(base).mkdir()
    for shard in default_shard_dir(tiny_base_dir).iterdir():
        (default_shard_dir(base) / shard.name).symlink_to(shard)
    shutil.copytree(tiny_base_dir / "tokenizer", base / "tokenizer")
    if CORE_AVAILABLE:
        write_tiny_eval_bundle(base)
    return base


def script_env(base, **overrides):
    """A pipeline script's environment: the venv's python first on PATH, one thread, tiny and offline."""
    env = child_env(base)
    env["PATH"] = os.path.join(REPO_ROOT, ".venv", "bin") + os.pathsep + env["PATH"]
    env.update(TINY="1", SKIP_SETUP="1", NPROC_PER_NODE="1")
    if not CORE_AVAILABLE:
        env["CORE_METRIC_EVERY"] = "-1"
    env.update(overrides)
    return env


def run_script(script, base, *args, timeout=300, **env):
    return subprocess.run(["bash", script, *args], cwd=REPO_ROOT, env=script_env(base, **env),
                          capture_output=True, text=True, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


# -----------------------------------------------------------------------------
# miniseries.sh and the run summary it reads


@pytest.fixture(scope="module")
def miniseries(series_base):
    result = run_script("miniseries.sh", series_base, "tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return series_base, result


def test_miniseries_tiny_fills_every_column_from_the_run_summary(miniseries):
    base, result = miniseries
    header, rows = read_rows(base / "tiny_miniseries_results" / "results.csv")
    assert header == CSV_COLUMNS["miniseries"]
    assert [row[0] for row in rows] == ["2", "3"]
    for row in rows:
        values = dict(zip(header, row))
        assert all(cell.strip() for cell in row), values
        # the parameter counts are those of the model the checkpoint holds
        checkpoint_dir = base / "base_checkpoints" / f"tiny_miniseries_d{values['depth']}"
        meta = json.loads((checkpoint_dir / f"meta_{int(values['num_iterations']):06d}.json").read_text())
        with torch.device("meta"):
            counts = GPT(GPTConfig(**meta["model_config"], **meta["model_options"])).num_scaling_params()
        assert int(values["num_params"]) == counts["total"]
        assert int(values["num_scaling_params"]) == counts["transformer_matrices"] + counts["lm_head"]
        summary = json.loads((checkpoint_dir / "summary.json").read_text())
        assert int(values["model_dim"]) == 64 * int(values["depth"])
        assert int(values["tokens_trained"]) == 256 * int(values["num_iterations"])  # TINY's 256-token steps
        assert float(values["param_data_ratio"]) == pytest.approx(int(values["tokens_trained"]) / int(values["num_scaling_params"]), rel=1e-4)
        assert float(values["train_time_sec"]) > 0
        # the val bpb is the one the run printed at its last step
        log = (base / "tiny_miniseries_results" / f"tiny_miniseries_d{values['depth']}_train.log").read_text()
        last_step, last_bpb = VAL_LINE.findall(log)[-1]
        assert int(last_step) == int(values["num_iterations"])
        assert float(values["val_bpb"]) == pytest.approx(float(last_bpb), abs=1e-6)
        if CORE_AVAILABLE:
            assert -1.0 <= float(values["core_score"]) <= 1.0
            assert f"Step {int(last_step):05d} | CORE metric: " in log
            assert summary["core_label"] == "CORE (partial: 2 of 22 tasks)"
        else:
            assert values["core_score"] == "nan"
            assert f"WARNING: Could not extract CORE score for d={values['depth']}" in result.stdout
    assert int(rows[1][4]) > int(rows[0][4])  # same tokens:params ratio, so the bigger model trains longer
    assert "Training d=3: params=" in result.stdout
    table = result.stdout.split("Results (")[-1].splitlines()
    assert table[1].split() == header and len(table) == 5  # title, header, rule, two rows


def test_miniseries_second_run_skips_the_depths_in_the_csv(miniseries):
    base, _ = miniseries
    csv_path = base / "tiny_miniseries_results" / "results.csv"
    before = csv_path.read_text()
    again = run_script("miniseries.sh", base, "tiny", timeout=60)
    assert again.returncode == 0, again.stderr
    assert "Skipping d=2 (already in results)" in again.stdout
    assert "Skipping d=3 (already in results)" in again.stdout
    assert "Training d=" not in again.stdout
    assert csv_path.read_text() == before


def test_run_summary_holds_the_histories_and_sizes(miniseries):
    base, _ = miniseries
    summary = json.loads((base / "base_checkpoints" / "tiny_miniseries_d3" / "summary.json").read_text())
    steps = summary["num_iterations"]
    assert summary["completed"] and summary["last_step"] == steps
    assert [entry["step"] for entry in summary["history"]["train_loss"]] == list(range(steps))
    val = summary["history"]["val_bpb"]
    assert val[0]["step"] == 0 and val[-1]["step"] == steps and val[-1]["val_bpb"] == summary["val_bpb"]
    assert summary["min_val_bpb"] == min(entry["val_bpb"] for entry in val)
    assert summary["total_training_flops"] == summary["flops_per_token"] * summary["tokens_trained"]
    assert summary["mfu_percent"] is None  # no peak FLOPs are known for a CPU
    if CORE_AVAILABLE:
        assert [entry["step"] for entry in summary["history"]["core_metric"]] == [steps]


def test_history_before_keeps_what_a_resumed_run_does_not_redo():
    summary = {"history": {"train_loss": [{"step": s, "loss": 5.0 - s} for s in range(6)],
                           "val_bpb": [{"step": s, "val_bpb": 2.0} for s in (0, 3, 6)],
                           "core_metric": [{"step": 6, "core_metric": 0.1}]}}
    kept = history_before(summary, 3)  # resumed from the step-3 checkpoint: steps 3.. are run and evaluated again
    assert [e["step"] for e in kept["train_loss"]] == [0, 1, 2]
    assert [e["step"] for e in kept["val_bpb"]] == [0]
    assert kept["core_metric"] == []
    assert history_before(None, 3) == {"train_loss": [], "val_bpb": [], "core_metric": []}


# -----------------------------------------------------------------------------
# scaling_laws.sh


def test_scaling_laws_tiny_row_matches_the_budget_and_a_rerun_skips_it(series_base):
    result = run_script("scaling_laws.sh", series_base, LABEL="tiny", DEPTHS="2", FLOPS_BUDGETS="4e9")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header, rows = read_rows(series_base / "scaling_laws_results_tiny" / "results.csv")
    assert header == CSV_COLUMNS["scaling_laws"]
    assert len(rows) == 1
    values = dict(zip(header, rows[0]))
    assert all(cell.strip() for cell in rows[0]), values
    assert values["flops_budget"] == "4e9" and values["depth"] == "2"
    parts = ["params_wte", "params_bigram_embed", "params_value_embeds", "params_lm_head", "params_transformer", "params_scalars"]
    assert sum(int(values[p]) for p in parts) == int(values["params_total"])
    summary = json.loads((series_base / "base_checkpoints" / "scaling_4e9_d2" / "summary.json").read_text())
    assert int(values["num_iterations"]) == round(4e9 / (summary["flops_per_token"] * 256))
    assert "Calculated number of iterations from target FLOPs" in result.stdout

    again = run_script("scaling_laws.sh", series_base, LABEL="tiny", DEPTHS="2", FLOPS_BUDGETS="4e9", timeout=60)
    assert again.returncode == 0, again.stderr
    assert "Skipping d=2 at 4e9 FLOPs (already in results)" in again.stdout
    assert len(read_rows(series_base / "scaling_laws_results_tiny" / "results.csv")[1]) == 1


# -----------------------------------------------------------------------------
# base_train's CORE flag


def test_core_metric_is_off_by_default_on_cpu():
    from scripts.base_train import parse_args, resolve_core_metric_every

    args = parse_args([])
    resolve_core_metric_every(args, "cpu")
    assert args.core_metric_every == -1
    explicit = parse_args(["--core-metric-every=-1"])
    resolve_core_metric_every(explicit, "cuda")  # an explicit -1 stays off everywhere
    assert explicit.core_metric_every == -1


def test_core_metric_without_its_inputs_fails_at_start(tiny_base_dir, monkeypatch, capsys):
    """Without nanochat.core_eval, or with it but no eval bundle: one line at start, no checkpoint."""
    from scripts.base_train import main as base_train_main

    if CORE_AVAILABLE:
        import nanochat.core_eval as core_eval

        monkeypatch.setattr(core_eval, "DOWNLOAD_ATTEMPTS", 1)
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{free_port()}/eval_bundle.zip")
        expected = "python -m dev.offline_data core"
    else:
        expected = "--core-metric-every=5 needs the CORE evaluation (nanochat.core_eval)"
    flags = [*TINY_FLAGS, "--num-iterations=2", "--core-metric-every=5", "--model-tag=core_missing"]
    code, out, err = run_in_process(base_train_main, "base_train", tiny_base_dir, flags)
    assert code == 2, out + err
    assert expected in out
    assert not (tiny_base_dir / "base_checkpoints" / "core_missing").exists()


def test_core_metric_on_too_few_examples_for_the_few_shot_prompts_fails_at_start(tiny_base_dir, tmp_path, monkeypatch, capsys):
    from scripts.base_train import main as base_train_main

    import nanochat.core_eval as core_eval

    small_bundle(str(tiny_base_dir / "eval_bundle_offline"), offline=True)  # its mc_task is 2-shot
    monkeypatch.setattr(core_eval, "DOWNLOAD_ATTEMPTS", 1)
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{free_port()}/eval_bundle.zip")
    try:
        flags = [*TINY_FLAGS, "--num-iterations=2", "--core-metric-every=5", "--core-metric-max-per-task=2",
                 "--model-tag=core_few"]
        code, out, err = run_in_process(base_train_main, "base_train", tiny_base_dir, flags)
    finally:
        shutil.rmtree(tiny_base_dir / "eval_bundle_offline")
    assert code == 2, out + err
    assert "CORE on 2 examples per task is too few for the few-shot prompts of mc_task (2-shot)" in out
    assert not (tiny_base_dir / "base_checkpoints" / "core_few").exists()


# -----------------------------------------------------------------------------
# dev/phase_lib.sh: skip a finished phase, resume one cut short


def run_phase(base, output, *command, dry_run=False):
    """run_phase in a fresh bash with $NANOCHAT_BASE_DIR=base; returns the CompletedProcess."""
    script = 'source dev/phase_lib.sh && run_phase fake fake-phase "$@"'
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PHASE_DRY_RUN="1" if dry_run else "0")
    return subprocess.run(["bash", "-c", script, "bash", output, "--", *command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def test_phase_lib_skips_done_phases_and_resumes_from_the_last_complete_checkpoint(tmp_path):
    checkpoints = tmp_path / "fake_checkpoints" / "d2"
    checkpoints.mkdir(parents=True)
    (tmp_path / "report").mkdir()

    fresh = run_phase(tmp_path, str(checkpoints), "echo", "ran", dry_run=False)
    assert fresh.stdout.splitlines() == ["[phase] fake: running", "ran", "[phase] fake: finished in 0m0s"]

    for step in (100, 200):
        (checkpoints / f"model_{step:06d}.pt").touch()
        (checkpoints / f"meta_{step:06d}.json").touch()
    (checkpoints / "model_000300.pt").touch()  # no meta: a save that did not finish
    (checkpoints / "meta_000400.json").touch()  # no model: not a checkpoint either
    resumed = run_phase(tmp_path, str(checkpoints), "echo", "ran")
    assert resumed.stdout.splitlines()[:2] == ["[phase] fake: resuming from its last checkpoint, step 200",
                                               "ran --resume-from-step=200"]

    (tmp_path / "report" / "fake-phase.md").write_text("## Fake phase\n")
    done = run_phase(tmp_path, str(checkpoints), "echo", "ran")
    assert done.stdout.splitlines() == ["[phase] fake: done (checkpoint step 200 and report section fake-phase exist); skipping"]

    # phases without checkpoints: the report section (and the named file) decide
    assert "skipping" in run_phase(tmp_path, "-", "echo", "ran").stdout
    missing_file = run_phase(tmp_path, str(tmp_path / "tokenizer.pkl"), "echo", "ran")
    assert missing_file.stdout.splitlines()[1] == "ran"
    dry = run_phase(tmp_path / "elsewhere", "-", "echo", "ran", dry_run=True)
    assert dry.stdout.splitlines() == ["[phase] fake: running", "[phase] would run: echo ran"]


FAKE_TRAINING_PHASE = r"""
# saves a checkpoint at step 2, then (first run) hangs until killed; a resumed run finishes
out="$NANOCHAT_BASE_DIR/fake_checkpoints/d2"
mkdir -p "$out"
echo "args: $*" >>"$NANOCHAT_BASE_DIR/calls.log"
case "$*" in
    *--resume-from-step=2*) touch "$out/model_000004.pt" "$out/meta_000004.json"
                            echo "## Fake phase" >"$NANOCHAT_BASE_DIR/report/fake-phase.md" ;;
    *) touch "$out/model_000002.pt" "$out/meta_000002.json"; sleep 60 ;;
esac
"""


def test_phase_killed_after_a_checkpoint_resumes_from_it_and_then_is_skipped(tmp_path):
    (tmp_path / "report").mkdir()
    fake = tmp_path / "fake_phase.sh"
    fake.write_text(FAKE_TRAINING_PHASE)
    checkpoints = tmp_path / "fake_checkpoints" / "d2"
    script = 'source dev/phase_lib.sh && run_phase fake fake-phase "$1" -- bash "$2" --depth=2'
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    command = ["bash", "-c", script, "bash", str(checkpoints), str(fake)]
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 20
    while not (checkpoints / "meta_000002.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the node is lost: the phase and everything under it die
    first.wait(timeout=10)
    assert not (tmp_path / "report" / "fake-phase.md").exists()

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert "[phase] fake: resuming from its last checkpoint, step 2" in second.stdout
    third = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert "[phase] fake: done (checkpoint step 4 and report section fake-phase exist); skipping" in third.stdout
    assert (tmp_path / "calls.log").read_text().splitlines() == ["args: --depth=2", "args: --depth=2 --resume-from-step=2"]


def test_speedrun_rerun_plan_skips_done_phases_and_resumes_the_cut_one(tmp_path):
    """PHASE_DRY_RUN=1: after a crash during pretraining, a re-run skips the tokenizer and resumes base_train."""
    for name in ("header", "tokenizer-training", "tokenizer-evaluation"):
        (tmp_path / "report").mkdir(exist_ok=True)
        (tmp_path / "report" / f"{name}.md").write_text("x\n")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.pkl").touch()
    checkpoints = tmp_path / "base_checkpoints" / "d20"
    checkpoints.mkdir(parents=True)
    (checkpoints / "model_004000.pt").touch()
    (checkpoints / "meta_004000.json").touch()
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PHASE_DRY_RUN="1", NPROC_PER_NODE="4", WANDB_RUN="w")
    result = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "[phase] tok_train: done (report section tokenizer-training exists); skipping" in lines
    assert "[phase] base_train: resuming from its last checkpoint, step 4000" in lines
    assert ("[phase] would run: torchrun --standalone --nproc_per_node=4 -m scripts.base_train -- --depth=20 "
            "--recipe=latest --save-every=2000 --keep-checkpoints=1 --run=w --resume-from-step=4000") in lines
    ran = [line.split("-m ", 1)[1].split(" ")[0] for line in lines if line.startswith("[phase] would run: torchrun")]
    assert ran == ["scripts.base_train", "scripts.base_loss", "scripts.base_eval", "scripts.mid_train",
                   "scripts.chat_eval", "scripts.chat_sft", "scripts.chat_eval"]
    assert not any("report reset" in line for line in lines)  # the run's report is kept
    assert lines[-1] == "[phase] would run: python -m nanochat.report generate"
    # the disk plan, phase by phase, comes before anything is downloaded; then the node check
    disk = [line for line in lines if line.startswith("[disk] ")]
    assert [line.split(":")[0] for line in disk[:3]] == ["[disk] base", "[disk] mid", "[disk] sft"]
    assert "keeps the newest 1" in disk[0]
    peak = float(next(line for line in disk if "at their peak" in line).split(": ")[1].split(" GB")[0])
    assert peak < 40  # a d20 speedrun never holds more than 40 GB of checkpoints
    preflight = lines.index("[phase] would run: python -m scripts.preflight --device-type=cuda --nproc=4 --depth=20 "
                            "--keep-checkpoints=1 --phases=base,mid,sft --data-shards=170 --run=w")
    assert preflight < min(i for i, line in enumerate(lines) if "nanochat.dataset" in line)


@pytest.mark.parametrize("variant, base_train_flags, shards", [
    ({"GPT2_RUN": "1"}, "--depth=24 --recipe=latest --target-param-data-ratio=8 --device-batch-size=16 --fp8", "170"),
    ({"RECIPE": "2026-01", "NANOCHAT_DATASET": "fineweb"}, "--depth=20 --recipe=2026-01 --target-param-data-ratio=20", "370"),
])
def test_speedrun_variants_plan_their_base_run_and_data(tmp_path, variant, base_train_flags, shards):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PHASE_DRY_RUN="1", **variant)
    result = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"scripts.base_train -- {base_train_flags} --save-every=2000" in result.stdout
    assert f"[phase] would run: python -m nanochat.dataset -n {shards}" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose torch has no CUDA")
def test_speedrun_stops_at_the_preflight_when_torch_cannot_use_the_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_nvidia_smi(bin_dir)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), SKIP_INSTALL="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    stops = [line for line in result.stdout.splitlines() if line.startswith("[preflight] STOP: ")]
    assert any("nvidia-smi lists 8 GPU(s)" in line and "driver 535.104.05" in line for line in stops), result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not list((tmp_path / "base").glob("base_data*/*.parquet")) and not (tmp_path / "base" / "tokenizer").exists()
    assert not (tmp_path / "base" / "report").exists()  # stopped before the run began


# -----------------------------------------------------------------------------
# shellcheck


def shell_scripts():
    found = []
    for folder, dirnames, filenames in os.walk(REPO_ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("target", "node_modules", "__pycache__")]
        found += [os.path.join(folder, f) for f in filenames if f.endswith(".sh")]
    return sorted(found)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (dev/install.sh installs it as root)")
def test_every_shell_script_passes_shellcheck():
    scripts = shell_scripts()
    assert any(path.endswith("speedrun.sh") for path in scripts)
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout

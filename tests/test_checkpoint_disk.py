"""
Bounded disk: --keep-checkpoints deletes old checkpoints only once a newer one is complete, so a
kill at any moment leaves one to resume from; a save onto a full filesystem is one clear error that
names the last complete step and leaves nothing half-written.
"""

import os
import subprocess
import sys
import uuid

import pytest
import torch

from conftest import REPO_ROOT, child_env
from nanochat import checkpoint_manager as cm
from nanochat.resume import DiskFullError, save_and_prune


def save(checkpoint_dir, step, keep=-1, size=16):
    save_and_prune(str(checkpoint_dir), step, {"w": torch.full((size,), float(step))},
                   {"state": {0: {"m": torch.full((size,), float(step))}}}, {"step": step}, keep=keep)


def files_of(checkpoint_dir):
    return sorted(os.listdir(checkpoint_dir))


def test_keep_leaves_the_newest_complete_checkpoints_and_clears_older_leftovers(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    (tmp_path / "model_000002.pt.k1l1ed.tmp").write_bytes(b"half a file")  # a write a kill cut short
    (tmp_path / "model_000004.pt").write_bytes(b"no meta: never completed")  # a save a kill cut short
    (tmp_path / "summary.json").write_text("{}")  # not a checkpoint file: left alone
    save(tmp_path, 5, keep=2)
    assert files_of(tmp_path) == ["meta_000003.json", "meta_000005.json", "model_000003.pt", "model_000005.pt",
                                  "optim_000003_rank0.pt", "optim_000005_rank0.pt", "summary.json"]
    save(tmp_path, 6, keep=1)
    assert cm.complete_steps(str(tmp_path)) == [6]


class Killed(BaseException):
    """The process died here: nothing after this point runs."""


def test_a_kill_at_any_filesystem_step_of_a_pruning_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    real_replace, real_remove = os.replace, os.remove
    kill_points = 0
    while True:
        directory = tmp_path / f"run{kill_points}"
        save(directory, 1, keep=1)
        save(directory, 2, keep=1)
        save(directory, 2, keep=1)  # a re-save of the same step (a resumed run's last step) too
        operations = []

        def maybe_die(real, *args):
            operations.append(args)
            if len(operations) > kill_points:
                raise Killed()
            return real(*args)

        monkeypatch.setattr(os, "replace", lambda *a: maybe_die(real_replace, *a))
        monkeypatch.setattr(os, "remove", lambda *a: maybe_die(real_remove, *a))
        try:
            save(directory, 3, keep=1)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "remove", real_remove)

        last = cm.find_last_step(str(directory))
        model_data, _, meta = cm.load_checkpoint(str(directory), last, "cpu")
        shard = cm.load_optimizer_for_rank(str(directory), last, "cpu", rank=0, world_size=1)
        assert meta["step"] == last and model_data["w"][0].item() == last == shard["state"][0]["m"][0].item()
        if finished:
            assert cm.complete_steps(str(directory)) == [3]
            break
        kill_points += 1
    assert kill_points >= 5  # replace model, optim, meta; remove meta 2, model 2, optim 2 (at least)


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size_mib): a tmpfs of that size (needs root, as CI and the dev boxes run); unmounted after the test."""
    mounted = []

    def mount(size_mib):
        mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)],
                                capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_names_the_last_complete_step_and_leaves_no_partial_files(small_filesystem):
    checkpoint_dir = small_filesystem(1) / "d2"
    save(checkpoint_dir, 1, size=50_000)  # 2 x 200 KB
    with pytest.raises(DiskFullError) as full:
        for step in (2, 3, 4):
            save(checkpoint_dir, step, size=50_000)
    message = str(full.value)
    step = int(message.split("saving step ")[1].split(" ")[0])
    assert f"the last complete checkpoint is step {step - 1}" in message
    assert f"--resume-from-step={step - 1}" in message and "GB free" in message
    assert not [name for name in files_of(checkpoint_dir) if f"{step:06d}" in name]  # nothing of the failed step
    assert cm.find_last_step(str(checkpoint_dir)) == step - 1


def test_base_train_out_of_space_is_one_line_without_a_traceback(tiny_base_dir, small_filesystem):
    checkpoint_dir = tiny_base_dir / "base_checkpoints" / "full"
    checkpoint_dir.parent.mkdir(exist_ok=True)
    os.symlink(small_filesystem(10), checkpoint_dir)  # a d2 checkpoint takes ~6.5 MB: the second save cannot fit
    flags = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256", "--eval-every=-1",
             "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--num-iterations=6",
             "--save-every=1", "--head-dim=64", "--model-tag=full"]
    try:
        result = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags], cwd=REPO_ROOT,
                                env=child_env(tiny_base_dir), capture_output=True, text=True, timeout=300)
    finally:
        os.remove(checkpoint_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("base_train: "))
    assert "out of disk space while saving step" in line and "--resume-from-step=" in line
    assert "Traceback" not in result.stdout + result.stderr

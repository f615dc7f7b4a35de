"""
The disk plan against real checkpoints: a tiny model's model file and optimizer shards (1 and 4
ranks) have the sizes the plan computes from shapes alone; the pruning arithmetic of a run.
"""

import os

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import disk_plan
from nanochat.optim import shard_state_dict
from nanochat.training import build_model, model_config_for_depth


def file_sizes(directory, prefix):
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory) if name.startswith(prefix))


@pytest.mark.parametrize("depth, head_dim, world_size", [(2, 64, 1), (4, 64, 4)])
def test_planned_checkpoint_size_matches_a_saved_checkpoint(tmp_path, depth, head_dim, world_size):
    config, _ = model_config_for_depth(depth, 512, head_dim=head_dim, max_seq_len=64)
    model = build_model(config, "cpu")
    optimizer = model.setup_optimizer()
    model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))).backward()
    optimizer.step()  # creates every state tensor
    full = optimizer.state_dict()
    cm.save_checkpoint(str(tmp_path), 1, model.state_dict(), full, {"step": 1})
    for rank in range(1, world_size):  # the other ranks' shards as a world_size-rank run writes them
        torch.save(shard_state_dict(full, rank, world_size), cm.optim_path(str(tmp_path), 1, rank))
    if world_size > 1:
        torch.save(shard_state_dict(full, 0, world_size), cm.optim_path(str(tmp_path), 1, 0))

    planned = disk_plan.checkpoint_size(config, world_size, embedding_dtype=torch.float32)  # CPU: fp32 embeddings
    real_model, real_optimizer = file_sizes(tmp_path, "model_"), file_sizes(tmp_path, "optim_")
    assert planned.model == pytest.approx(real_model, rel=0.02)
    assert planned.optimizer == pytest.approx(real_optimizer, rel=0.02)


def test_bf16_embeddings_halve_only_the_embedding_tables():
    config, _ = model_config_for_depth(2, 512, head_dim=64, max_seq_len=64)
    fp32 = disk_plan.checkpoint_size(config, 1, embedding_dtype=torch.float32)
    bf16 = disk_plan.checkpoint_size(config, 1, embedding_dtype=torch.bfloat16)
    model = build_model(config, "meta")
    embedding_bytes = (model.transformer.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())) * 4
    assert fp32.model - bf16.model == embedding_bytes // 2
    assert fp32.optimizer == bf16.optimizer  # optimizer moments are fp32 either way


def test_keep_bounds_what_a_phase_holds():
    assert disk_plan.checkpoints_held(1) == (2, 1)  # the new one is written while the old one still exists
    assert disk_plan.checkpoints_held(2, saves=1) == (1, 1)
    assert disk_plan.checkpoints_held(-1, saves=9) == (9, 9)
    assert disk_plan.checkpoints_held(-1) == (None, None)
    assert disk_plan.base_train_saves(16560, 2000) == 9 and disk_plan.base_train_saves(16000, 2000) == 8
    assert disk_plan.base_train_saves(100, -1) == 1


def test_a_run_peak_stacks_each_phase_on_what_the_earlier_ones_left():
    config, _ = model_config_for_depth(2, 512, head_dim=64, max_seq_len=64)
    size = disk_plan.checkpoint_size(config, 2).total
    plans, peak = disk_plan.plan_checkpoints(config, 2, keep=1, phases=["base", "mid", "sft"])
    assert [p.peak_count for p in plans] == [2, 2, 2] and peak == 4 * size  # 1 + 1 left, 2 while SFT saves
    _, unbounded = disk_plan.plan_checkpoints(config, 2, keep=-1, phases=["base", "mid"], saves={"base": 3})
    assert unbounded is None  # mid's step count is not known ahead


@pytest.mark.parametrize("name,directory,val_shard", [("climbmix", "base_data_climbmix", 6542), ("fineweb", "base_data", 1822)])
def test_plan_counts_only_the_chosen_datasets_shards_still_missing(tmp_path, monkeypatch, name, directory, val_shard):
    monkeypatch.setenv("NANOCHAT_DATASET", name)
    other = "base_data" if directory != "base_data" else "base_data_climbmix"
    for folder in (directory, other):  # the other dataset's shards count for nothing
        (tmp_path / folder).mkdir()
        for index in (0, 1, val_shard):
            (tmp_path / folder / f"shard_{index:05d}.parquet").write_bytes(b"x")
    (tmp_path / other / "shard_00002.parquet").write_bytes(b"x")
    (tmp_path / "eval_bundle").mkdir()
    (tmp_path / "task_data").mkdir()
    plan = disk_plan.plan_run(2, 1, 1, ["base"], data_shards=5, base_dir=str(tmp_path), vocab_size=512)
    assert plan.data == 3 * disk_plan.SHARD_BYTES and plan.other == 0  # shards 2, 3 and 4
    assert plan.still_to_write == plan.data + plan.checkpoint_peak
    title = "ClimbMix-400B" if name == "climbmix" else "FineWeb-Edu-100B"
    assert f"of {title} shards" in "\n".join(disk_plan.describe(plan, 1))

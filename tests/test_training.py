"""
nanochat/training.py: the schedules every phase steps by, the GC policy, the --keep-checkpoints flag.
"""

import argparse
import gc

import pytest

from nanochat.training import (
    add_keep_checkpoints_flag, late_decay_lr, linear_decay_lr, manage_garbage_collection, muon_momentum,
    warmup_warmdown_lr,
)


def test_gc_is_frozen_after_the_first_step_of_a_resumed_run_too():
    assert gc.isenabled()
    try:
        manage_garbage_collection(step=8, first_step=8)  # a run resumed at step 8
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_lr_schedule_is_flat_then_linear_warmdown():
    N = 100
    assert [warmup_warmdown_lr(it, N, 0.0, 0.5, 0.0) for it in (0, 25, 50)] == [1.0, 1.0, 1.0]
    assert warmup_warmdown_lr(75, N, 0.0, 0.5, 0.0) == pytest.approx(0.5)
    assert warmup_warmdown_lr(100, N, 0.0, 0.5, 0.1) == pytest.approx(0.1)
    assert [warmup_warmdown_lr(it, N, 0.1, 0.5, 0.0) for it in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert (muon_momentum(0), muon_momentum(150), muon_momentum(300), muon_momentum(5000)) == pytest.approx((0.85, 0.90, 0.95, 0.95))


def test_midtraining_schedule_is_flat_then_linear_to_zero_by_progress():
    assert [late_decay_lr(p) for p in (0.0, 0.5, 0.79)] == [1.0, 1.0, 1.0]
    assert late_decay_lr(0.9) == pytest.approx(0.5) and late_decay_lr(1.0) == pytest.approx(0.0) and late_decay_lr(1.2) == 0.0


def test_rl_schedule_decays_linearly_over_its_steps():
    assert [linear_decay_lr(step, 4) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_keep_checkpoints_takes_minus_one_or_a_positive_count():
    parser = argparse.ArgumentParser()
    add_keep_checkpoints_flag(parser)
    assert parser.parse_args([]).keep_checkpoints == -1
    assert parser.parse_args(["--keep-checkpoints=2"]).keep_checkpoints == 2
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            parser.parse_args([f"--keep-checkpoints={bad}"])


def test_recipe_2026_07_schedules_momentum_up_to_097_then_down_over_the_warmdown_and_decays_wd_by_cosine():
    from nanochat.training import muon_momentum_2026_07, weight_decay_factor

    N, warmdown = 1000, 0.65  # warmdown starts at step 350, inside the 400-step momentum warmup
    assert muon_momentum_2026_07(0, N, warmdown) == pytest.approx(0.85)
    assert muon_momentum_2026_07(200, N, warmdown) == pytest.approx(0.91)  # warmup wins over the warmdown
    assert muon_momentum_2026_07(675, N, warmdown) == pytest.approx(0.935)  # halfway through the warmdown
    assert muon_momentum_2026_07(400, 10_000, warmdown) == pytest.approx(0.97)
    assert [weight_decay_factor(it, N, "2026-07") for it in (0, 500, 1000)] == pytest.approx([1.0, 0.5, 0.0])
    assert [weight_decay_factor(it, N, "2026-01") for it in (0, 250, 1000)] == pytest.approx([1.0, 0.75, 0.0])


def test_recipe_flag_sets_the_base_train_defaults_and_2026_01_brings_the_old_ones_back():
    from nanochat.training_plan import RECIPE_DEFAULTS
    from scripts.base_train import parse_args

    latest, old = parse_args([]), parse_args(["--recipe=2026-01"])
    assert latest.recipe == "2026-07" and old.recipe == "2026-01"
    for name, value in RECIPE_DEFAULTS["2026-07"].items():
        assert getattr(latest, name) == value, name
    assert (old.target_param_data_ratio, old.total_batch_size, old.warmdown_ratio, old.weight_decay) == (10.5, 524288, 0.5, 0.2)
    assert parse_args(["--recipe=2026-01", "--warmdown-ratio=0.3"]).warmdown_ratio == 0.3  # a flag given wins

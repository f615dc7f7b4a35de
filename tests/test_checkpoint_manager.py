"""
Checkpoint save/load: round trips, upstream key compatibility, old-checkpoint patches, atomic
writes under crashes, clear errors, checkpoint discovery, and optimizer shards saved on 2 ranks
resumed on 1 (and the reverse).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_gpt
from nanochat import checkpoint_manager as cm
from nanochat.common import MissingInputError
from nanochat.gpt import GPT, GPTConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def tokenizer(base_dir, tiny_tokenizer):
    """The session's tiny tokenizer, saved where build_model looks for it."""
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    return tiny_tokenizer


def tiny_config(vocab_size, **overrides):
    kwargs = dict(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                  window_pattern="SL")
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def make_model(config, seed=0):
    # noisy weights, so the round trip tests every tensor (zero-initialized ones included)
    return build_gpt(config, seed, perturb=0.01)


def config_dict(config):
    return dict(vars(config))


def sample_tokens(vocab_size, batch=2, seq=16, seed=1):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_model(checkpoint_dir, step, model, model_data=None, model_config=None):
    meta = {"step": step, "model_config": model_config or config_dict(model.config)}
    data = model_data if model_data is not None else model.state_dict()
    cm.save_checkpoint(str(checkpoint_dir), step, data, None, meta)


# -----------------------------------------------------------------------------
# Round trips and compatibility


def test_save_then_load_model_gives_identical_state_and_logits(base_dir, tokenizer):
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    save_model(base_dir / "base_checkpoints" / "d2", 7, model)

    loaded, loaded_tokenizer, meta = cm.load_model("base", "cpu", phase="eval")
    assert meta["step"] == 7 and meta["world_size"] == 1
    assert loaded_tokenizer.get_vocab_size() == tokenizer.get_vocab_size()
    assert not loaded.training
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    idx = sample_tokens(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))

    trained, _, _ = cm.load_model("base", "cpu", phase="train", model_tag="d2", step=7)
    assert trained.training


def test_files_and_meta_follow_the_upstream_layout(base_dir):
    checkpoint_dir = base_dir / "ckpt"
    # A world_size copied from another run's meta must not survive: it counts this run's shards.
    meta = {"step": 12, "x": [1, 2], "world_size": 8}
    cm.save_checkpoint(str(checkpoint_dir), 12, {"w": torch.ones(2)}, {"s": torch.zeros(1)}, meta)
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000012.json", "model_000012.pt", "optim_000012_rank0.pt"]
    text = (checkpoint_dir / "meta_000012.json").read_text()
    assert text == json.dumps({"step": 12, "x": [1, 2], "world_size": 1}, indent=2)
    model_data, optim_data, meta = cm.load_checkpoint(str(checkpoint_dir), 12, "cpu", load_optimizer=True)
    assert torch.equal(model_data["w"], torch.ones(2)) and torch.equal(optim_data["s"], torch.zeros(1))
    assert meta["x"] == [1, 2]


def test_compiled_model_keys_with_orig_mod_prefix_load_strictly(base_dir, tokenizer):
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    compiled_keys = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    save_model(base_dir / "base_checkpoints" / "d2", 1, model, model_data=compiled_keys)

    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    idx = sample_tokens(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_upstream_state_dict_keys_load_with_strict_true(base_dir, tokenizer):
    # Upstream nanochat's state-dict names and shapes for a 2-layer model (value embeddings and ve_gate on layer 1 only).
    V_pad, C = 320, 64
    upstream_shapes = {
        "transformer.wte.weight": (V_pad, C), "lm_head.weight": (V_pad, C),
        "resid_lambdas": (2,), "x0_lambdas": (2,), "value_embeds.1.weight": (V_pad, C),
        "transformer.h.1.attn.ve_gate.weight": (2, 32),
    }
    for i in range(2):
        for name, shape in [("attn.c_q", (C, C)), ("attn.c_k", (C, C)), ("attn.c_v", (C, C)),
                            ("attn.c_proj", (C, C)), ("mlp.c_fc", (4 * C, C)), ("mlp.c_proj", (C, 4 * C))]:
            upstream_shapes[f"transformer.h.{i}.{name}.weight"] = shape
    torch.manual_seed(3)
    upstream = {k: torch.randn(shape, dtype=torch.bfloat16) for k, shape in upstream_shapes.items()}
    config = tiny_config(tokenizer.get_vocab_size())
    save_model(base_dir / "base_checkpoints" / "d2", 5, None, model_data=upstream, model_config=config_dict(config))

    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    state = loaded.state_dict()
    assert state.keys() == upstream.keys()
    for key, tensor in upstream.items():
        assert torch.equal(state[key], tensor.float()), key


def test_bf16_tensors_are_cast_to_fp32_on_cpu(base_dir, tokenizer):
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    bf16_data = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_model(base_dir / "base_checkpoints" / "d2", 3, model, model_data=bf16_data)

    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, bf16_data[key].float()), key
    assert all(p.requires_grad for p in loaded.parameters())


def test_load_model_state_takes_compiled_bf16_state_into_the_models_dtypes():
    """What base_train's resume uses: a checkpoint from a compiled CUDA run (bf16, _orig_mod.) loads on CPU."""
    saved = make_model(tiny_config(300), seed=0)
    compiled_bf16 = {f"_orig_mod.{k}": v.to(torch.bfloat16) for k, v in saved.state_dict().items()}
    target = make_model(tiny_config(300), seed=1)
    cm.load_model_state(target, compiled_bf16)
    for key, tensor in target.state_dict().items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, compiled_bf16[f"_orig_mod.{key}"].float()), key


def test_compiled_old_checkpoint_keeps_its_saved_lambdas(base_dir, tokenizer):
    """Prefixes are stripped before the missing-key patches, so saved lambdas are never overwritten."""
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    prefixed = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_model(base_dir / "base_checkpoints" / "d2", 4, model, model_data=prefixed)
    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    assert torch.equal(loaded.resid_lambdas, model.resid_lambdas)
    assert torch.equal(loaded.x0_lambdas, model.x0_lambdas)


def test_old_checkpoint_without_lambdas_or_window_pattern_is_patched(base_dir, tokenizer):
    config = tiny_config(tokenizer.get_vocab_size(), window_pattern="L")
    model = make_model(config)
    old_data = {k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    old_config = {k: v for k, v in config_dict(config).items() if k != "window_pattern"}
    save_model(base_dir / "base_checkpoints" / "d2", 2, model, model_data=old_data, model_config=old_config)

    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas, torch.ones(2)) and torch.equal(loaded.x0_lambdas, torch.zeros(2))
    # Same as the old architecture: a plain residual stream with full attention everywhere.
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.0)
        idx = sample_tokens(tokenizer.get_vocab_size())
        assert torch.equal(loaded(idx), model(idx))


# The fields of upstream's GPTConfig, at 348fbb3 (2026-01) and 92d63d4 (2026-07) alike: its loader
# calls GPTConfig(**meta["model_config"]), which fails on any other key.
UPSTREAM_GPTCONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}


def test_old_format_checkpoint_loads_as_the_2026_01_model_with_identical_logits(base_dir, tokenizer):
    """Meta with upstream's 7 fields and no model_options, no smear/backout keys: every checkpoint before them."""
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    shape_only = {k: v for k, v in config_dict(model.config).items() if k in UPSTREAM_GPTCONFIG_FIELDS}
    save_model(base_dir / "base_checkpoints" / "d2", 6, model, model_config=shape_only)
    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    assert loaded.config == GPTConfig(**shape_only) and loaded.config.recipe() == "2026-01"
    idx = sample_tokens(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("recipe", ["2026-01", "2026-07"])
def test_meta_keeps_upstream_gptconfig_fields_apart_and_rebuilds_the_model(base_dir, tokenizer, recipe):
    config = GPTConfig.for_recipe(recipe, **config_dict(tiny_config(tokenizer.get_vocab_size())))
    model = make_model(config)
    entries = config.meta_entries()
    assert set(entries["model_config"]) == UPSTREAM_GPTCONFIG_FIELDS  # so upstream's code loads ours
    assert set(entries["model_config"]) | set(entries["model_options"]) == set(config_dict(config))
    cm.save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 9, model.state_dict(), None, {"step": 9, **entries})
    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    assert loaded.config == config
    idx = sample_tokens(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_model_options_in_meta_win_over_what_the_state_dict_suggests():
    ablation = GPTConfig.for_recipe("2026-07", smear=False)  # no smear gate in its state dict
    entries = ablation.meta_entries()
    keys = ["backout_lambda", "transformer.wte.weight"]
    assert GPTConfig.from_meta(entries["model_config"], entries["model_options"], keys) == ablation
    assert GPTConfig.from_meta(entries["model_config"], None, keys) == GPTConfig(**entries["model_config"])
    compiled_upstream_keys = ["_orig_mod.smear_gate.weight", "_orig_mod.transformer.wte.weight"]
    assert GPTConfig.from_meta(entries["model_config"], None, compiled_upstream_keys).recipe() == "2026-07"


def test_tokenizer_vocab_mismatch_is_a_clear_error(base_dir, tokenizer):
    model = make_model(tiny_config(tokenizer.get_vocab_size() + 64))
    save_model(base_dir / "base_checkpoints" / "d2", 1, model)
    with pytest.raises(ValueError, match="tokenizer.*restore the tokenizer"):
        cm.load_model("base", "cpu", phase="eval")


def test_bad_phase_and_source_are_rejected(base_dir):
    with pytest.raises(ValueError, match="phase must be"):
        cm.build_model(str(base_dir), 0, "cpu", phase="inference")
    with pytest.raises(ValueError, match="base, mid, sft, rl"):
        cm.load_model("pretrain", "cpu", phase="eval")


def test_sources_map_to_upstream_directories(base_dir):
    for source, dirname in [("base", "base_checkpoints"), ("mid", "mid_checkpoints"),
                            ("sft", "chatsft_checkpoints"), ("rl", "chatrl_checkpoints")]:
        assert cm.checkpoints_dir_for(source) == os.path.join(str(base_dir), dirname)


# -----------------------------------------------------------------------------
# Atomic writes and damaged checkpoints


def test_exception_mid_write_leaves_no_new_checkpoint(base_dir, monkeypatch):
    checkpoint_dir = str(base_dir / "ckpt")
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.ones(3)}, None, {"step": 1})
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        cm.save_checkpoint(checkpoint_dir, 2, {"w": torch.ones(3)}, None, {"step": 2})
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000001.json", "model_000001.pt"]
    assert cm.find_last_step(checkpoint_dir) == 1


def test_killed_process_mid_save_leaves_previous_checkpoint_last(base_dir):
    checkpoint_dir = str(base_dir / "ckpt")
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.ones(3)}, None, {"step": 1})
    # A child that dies hard (no cleanup, like SIGKILL or a power cut) halfway through writing step 2.
    program = textwrap.dedent(f"""
        import os, torch
        from nanochat import checkpoint_manager as cm
        real_save = torch.save
        def save_half_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            f.flush()
            os._exit(9)
        torch.save = save_half_then_die
        cm.save_checkpoint({checkpoint_dir!r}, 2, {{"w": torch.ones(1000)}}, None, {{"step": 2}})
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    leftovers = [name for name in os.listdir(checkpoint_dir) if "000002" in name]
    assert leftovers and all(name.endswith(".tmp") for name in leftovers)  # only the temp file survived
    assert cm.find_last_step(checkpoint_dir) == 1
    model_data, _, meta = cm.load_checkpoint(checkpoint_dir, 1, "cpu")
    assert meta["step"] == 1 and torch.equal(model_data["w"], torch.ones(3))


def fake_world(monkeypatch, world_size):
    """torch.distributed as every rank of an initialized `world_size`-rank run sees it."""
    monkeypatch.setattr(cm.dist, "is_available", lambda: True)
    monkeypatch.setattr(cm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cm.dist, "get_world_size", lambda: world_size)


@pytest.mark.parametrize("collective, world_size, barriers", [(False, 2, 0), (True, 1, 0), (True, 2, 2)])
def test_save_checkpoint_waits_for_other_ranks_only_when_collective_on_several_ranks(
        tmp_path, monkeypatch, collective, world_size, barriers):
    fake_world(monkeypatch, world_size)
    barrier_calls = []
    monkeypatch.setattr(cm.dist, "barrier", lambda: barrier_calls.append(1))
    cm.save_checkpoint(str(tmp_path), 1, {"w": torch.ones(1)}, {"s": torch.ones(1)}, {"step": 1},
                       rank=0, collective=collective)
    assert len(barrier_calls) == barriers
    assert json.loads((tmp_path / "meta_000001.json").read_text())["world_size"] == world_size


def test_collective_resave_waits_with_the_old_meta_gone_and_writes_the_new_one_after_every_shard(tmp_path, monkeypatch):
    checkpoint_dir = str(tmp_path)
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.ones(1)}, {"s": torch.ones(1)}, {"step": 1})
    fake_world(monkeypatch, 2)
    seen_at_barriers = []  # (meta present, model weight on disk) at each barrier

    def barrier():
        meta_present = os.path.exists(os.path.join(checkpoint_dir, "meta_000001.json"))
        model_weight = torch.load(os.path.join(checkpoint_dir, "model_000001.pt"))["w"].item()
        seen_at_barriers.append((meta_present, model_weight))

    monkeypatch.setattr(cm.dist, "barrier", barrier)
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.zeros(1)}, {"s": torch.zeros(1)}, {"step": 1},
                       rank=0, collective=True)
    # 1st: the old meta is gone before any rank overwrites its shard; 2nd: the new files, still no meta
    assert seen_at_barriers == [(False, 1.0), (False, 0.0)]
    assert json.loads((tmp_path / "meta_000001.json").read_text())["world_size"] == 2


def test_a_missing_optimizer_shard_is_a_missing_input_naming_the_file(tmp_path, monkeypatch):
    """Rank 0 of a 2-rank run saving alone (as upstream's mid_train) leaves rank 1's shard missing."""
    with monkeypatch.context() as patch:
        fake_world(patch, 2)
        cm.save_checkpoint(str(tmp_path), 1, {"w": torch.ones(1)}, {"s": torch.ones(1)}, {"step": 1})
    with pytest.raises(MissingInputError, match=r"saved on 2 ranks but optimizer shards are missing: .*_rank1\.pt"):
        cm.load_optimizer_for_rank(str(tmp_path), 1, "cpu", rank=0, world_size=1)
    with pytest.raises(MissingInputError, match=r"no checkpoint file at .*optim_000001_rank1\.pt"):
        cm.load_checkpoint(str(tmp_path), 1, "cpu", load_optimizer=True, rank=1)


def test_model_without_meta_is_an_incomplete_checkpoint(base_dir):
    checkpoint_dir = str(base_dir / "ckpt")
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.ones(1)}, None, {"step": 1})
    torch.save({"w": torch.ones(1)}, os.path.join(checkpoint_dir, "model_000005.pt"))  # crashed before its meta
    assert cm.find_last_step(checkpoint_dir) == 1
    with pytest.raises(FileNotFoundError, match="meta_000005.json"):
        cm.load_checkpoint(checkpoint_dir, 5, "cpu")


def test_resaving_a_step_removes_its_old_meta_until_the_new_one_lands(base_dir, monkeypatch):
    checkpoint_dir = str(base_dir / "ckpt")
    cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.ones(1)}, None, {"step": 1})

    def fail(*args, **kwargs):
        raise OSError("crash")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.zeros(1)}, None, {"step": 1})
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(checkpoint_dir)


def test_missing_checkpoint_error_names_the_path_and_what_to_do(base_dir):
    with pytest.raises(FileNotFoundError, match=r"model_000004\.pt: pass a saved step"):
        cm.load_checkpoint(str(base_dir / "ckpt"), 4, "cpu")
    with pytest.raises(FileNotFoundError, match=r"no base checkpoint in .*base_checkpoints: run `python -m scripts\.base_train` first$"):
        cm.load_model("base", "cpu", phase="eval")
    os.makedirs(base_dir / "base_checkpoints" / "d4")
    cm.save_checkpoint(str(base_dir / "base_checkpoints" / "d4"), 2, {"w": torch.ones(1)}, None, {"step": 2})
    with pytest.raises(FileNotFoundError, match=r"no sft checkpoint in .*chatsft_checkpoints: run `python -m scripts\.chat_sft` "
                                                r"first \(checkpoints of other phases exist: base\)"):
        cm.load_model("sft", "cpu", phase="eval")
    with pytest.raises(FileNotFoundError, match=r"base_checkpoints/d6: .*or pass another model tag \(there: d4\)"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d6")
    with pytest.raises(FileNotFoundError, match=r"no base checkpoint at step 5 .*d4 \(complete steps: 2\): pass one of those"):
        cm.load_model("base", "cpu", phase="eval", model_tag="d4", step=5)


def test_truncated_checkpoint_error_names_the_path(base_dir):
    checkpoint_dir = str(base_dir / "ckpt")
    cm.save_checkpoint(checkpoint_dir, 3, {"w": torch.randn(1000)}, {"m": torch.randn(1000)}, {"step": 3})
    path = os.path.join(checkpoint_dir, "model_000003.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(cm.CheckpointError, match=r"checkpoint file .*model_000003\.pt is damaged"):
        cm.load_checkpoint(checkpoint_dir, 3, "cpu")
    with open(os.path.join(checkpoint_dir, "meta_000003.json"), "w") as f:
        f.write('{"step": ')
    with pytest.raises(cm.CheckpointError, match=r"meta_000003\.json is damaged"):
        cm.load_checkpoint(checkpoint_dir, 3, "cpu")


# -----------------------------------------------------------------------------
# Finding checkpoints


def test_find_largest_model_prefers_deepest_tag_then_newest_dir(tmp_path):
    assert cm.find_largest_model(str(tmp_path / "missing")) is None
    assert cm.find_largest_model(str(tmp_path)) is None
    for name in ["custom", "d4", "d12", "d8_wide"]:
        os.makedirs(tmp_path / name)
    (tmp_path / "d20_is_a_file").write_text("")
    assert cm.find_largest_model(str(tmp_path)) == "d12"

    other = tmp_path / "other"
    for name, mtime in [("older", 1000), ("newer", 2000), ("oldest", 10)]:
        os.makedirs(other / name)
        os.utime(other / name, (mtime, mtime))
    assert cm.find_largest_model(str(other)) == "newer"


def test_find_last_step_takes_the_highest_complete_step(tmp_path):
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(str(tmp_path))
    for step in [5, 100, 20]:
        cm.save_checkpoint(str(tmp_path), step, {}, None, {})
    for name in ["model_000200.pt", "model_final.pt", "model_000300.pt.abc.tmp", "xmodel_000400.pt"]:
        (tmp_path / name).write_text("")
    (tmp_path / "meta_000400.json").write_text("{}")
    assert cm.find_last_step(str(tmp_path)) == 100


# -----------------------------------------------------------------------------
# Optimizer shards: saved on N ranks, resumed on M


def averaged_train_step(model, optimizer, batches):
    """One step of a single process that sees what every rank saw: the mean of the per-rank losses."""
    loss = sum(model(batch[:, :-1], batch[:, 1:].contiguous()) for batch in batches) / len(batches)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def assert_same_params(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def test_optimizer_state_of_own_world_size_loads_its_own_shard(tmp_path):
    model = make_model(tiny_config(265))
    optimizer = model.setup_optimizer()
    batch = sample_tokens(265, batch=2, seq=17)
    averaged_train_step(model, optimizer, [batch])
    cm.save_checkpoint(str(tmp_path), 1, model.state_dict(), optimizer.state_dict(), {"step": 1})
    loaded = cm.load_optimizer_for_rank(str(tmp_path), 1, "cpu", rank=0, world_size=1)
    _, own_shard, _ = cm.load_checkpoint(str(tmp_path), 1, "cpu", load_optimizer=True)
    assert loaded["sharding"] == own_shard["sharding"] == optimizer.state_dict()["sharding"]
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(loaded["state"][index][name]), torch.as_tensor(value))

    cm.save_checkpoint(str(tmp_path), 2, model.state_dict(), None, {"step": 2})
    assert cm.load_optimizer_for_rank(str(tmp_path), 2, "cpu", rank=0, world_size=2) is None  # saved without one


def test_load_optimizer_state_is_none_when_the_checkpoint_has_no_optimizer_state(base_dir):
    """As upstream: SFT warm-starts from the base optimizer if there is one, else starts fresh."""
    model = make_model(tiny_config(265))
    optimizer = model.setup_optimizer()
    averaged_train_step(model, optimizer, [sample_tokens(265, batch=2, seq=17)])
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    cm.save_checkpoint(checkpoint_dir, 1, model.state_dict(), optimizer.state_dict(), {"step": 1})
    cm.save_checkpoint(checkpoint_dir, 2, model.state_dict(), None, {"step": 2})

    assert cm.load_optimizer_state("base", "cpu", rank=0) is None  # last step (2) has none
    loaded = cm.load_optimizer_state("base", "cpu", rank=0, model_tag="d2", step=1)
    assert loaded["sharding"] == optimizer.state_dict()["sharding"]
    resharded = cm.load_optimizer_state("base", "cpu", rank=1, step=1, world_size=2)
    assert resharded["sharding"]["world_size"] == 2 and resharded["sharding"]["rank"] == 1


def test_checkpoint_saved_from_cuda_loads_on_a_cpu_only_machine(base_dir, tokenizer, monkeypatch):
    """Every load maps tensors onto the requested device (torch.load's map_location)."""
    model = make_model(tiny_config(tokenizer.get_vocab_size()))
    optimizer = model.setup_optimizer()
    averaged_train_step(model, optimizer, [sample_tokens(tokenizer.get_vocab_size(), batch=2, seq=17)])
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    # torch.save records each storage's device by this tag: write the files as a CUDA run would
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        cm.save_checkpoint(checkpoint_dir, 3, model.state_dict(), optimizer.state_dict(),
                           {"step": 3, "model_config": config_dict(model.config)})
    with open(os.path.join(checkpoint_dir, "model_000003.pt"), "rb") as f:
        with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does here
            torch.load(f, weights_only=True)

    model_data, optimizer_data, _ = cm.load_checkpoint(checkpoint_dir, 3, "cpu", load_optimizer=True)
    assert all(t.device.type == "cpu" for t in model_data.values())
    assert optimizer_data["state"][0]["exp_avg"].device.type == "cpu"
    loaded, _, _ = cm.load_model("base", "cpu", phase="eval")
    idx = sample_tokens(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    for rank, world_size in ((0, 1), (1, 2)):  # own shard, and re-sharded
        state = cm.load_optimizer_for_rank(checkpoint_dir, 3, "cpu", rank, world_size)
        assert all(t.device.type == "cpu" for s in state["state"].values() for t in s.values() if torch.is_tensor(t))

@pytest.mark.slow
def test_optimizer_shards_resume_on_another_world_size(tmp_path):
    """
    2 ranks (torchrun, gloo) train 2 steps and save 2 optimizer shards; 1 process resumes from
    them and its 3rd step matches the 2-rank run's own 3rd step. The reverse (a 1-process
    checkpoint resumed on 2 ranks) and a same-size resume run in the worker.
    """
    config = tiny_config(265)  # padded to 320 rows, which split evenly over 2 ranks
    initial = make_model(config)
    batches = torch.randint(0, 265, (3, 2, 2, 17), generator=torch.Generator().manual_seed(5))
    torch.save({"model_config": config_dict(config), "initial_state": initial.state_dict(), "batches": batches},
               tmp_path / "setup.pt")

    # One process seeing both ranks' data: steps 1-2, a checkpoint, step 3.
    model = make_model(config)
    optimizer = model.setup_optimizer()
    for step in range(2):
        averaged_train_step(model, optimizer, batches[step])
    cm.save_checkpoint(str(tmp_path / "one_rank"), 2, model.state_dict(), optimizer.state_dict(),
                       {"model_config": config_dict(config)})
    averaged_train_step(model, optimizer, batches[2])
    one_rank_step3 = model.state_dict()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO_ROOT, "tests", "dist_ckpt_worker.py"), str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    two_ranks_dir = str(tmp_path / "two_ranks")
    assert sorted(os.listdir(two_ranks_dir)) == ["meta_000002.json", "model_000002.pt",
                                                 "optim_000002_rank0.pt", "optim_000002_rank1.pt"]
    assert cm.load_meta(two_ranks_dir, 2)["world_size"] == 2
    _, shard0, meta = cm.load_checkpoint(two_ranks_dir, 2, "cpu", load_optimizer=True, rank=0)
    assert meta["world_size"] == 2 and shard0["sharding"]["world_size"] == 2

    # 2 ranks -> 1 process: consolidated state, and the 3rd step equals the 2-rank continuation.
    model_data, _, _ = cm.load_checkpoint(two_ranks_dir, 2, "cpu")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(model_data)
    optimizer = model.setup_optimizer()
    full_state = cm.load_optimizer_for_rank(two_ranks_dir, 2, "cpu", rank=0, world_size=1)
    assert full_state["sharding"]["world_size"] == 1
    wte_index = 1  # group order of setup_optimizer: lm_head, wte, ...
    assert full_state["state"][wte_index]["exp_avg"].shape == (320, 64)
    assert shard0["state"][wte_index]["exp_avg"].shape == (160, 64)
    optimizer.load_state_dict(full_state)
    averaged_train_step(model, optimizer, batches[2])
    two_ranks_step3 = torch.load(tmp_path / "two_ranks_step3.pt")
    assert_same_params(model.state_dict(), two_ranks_step3, atol=1e-5)

    # Rank 0 alone, not collective (upstream's mid_train): a complete checkpoint, no hang.
    assert sorted(os.listdir(tmp_path / "rank0_only")) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]

    # Same world size: each rank's own shard gives exactly the continued run.
    assert_same_params(torch.load(tmp_path / "two_ranks_resumed_step3.pt"), two_ranks_step3, atol=0)
    # 1 process -> 2 ranks: the re-sharded 3rd step equals the single-process one.
    assert_same_params(torch.load(tmp_path / "one_to_two_step3.pt"), one_rank_step3, atol=1e-5)

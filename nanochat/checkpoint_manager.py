"""
Saving and loading checkpoints: model weights, per-rank optimizer shards and a JSON of metadata.

Layout of one checkpoint (step is zero-padded to 6 digits), e.g. under
$NANOCHAT_BASE_DIR/base_checkpoints/d20/:

    model_000500.pt           state dict of the model (written by rank 0)
    optim_000500_rank<R>.pt   optimizer state of rank R (every rank writes its own shard)
    meta_000500.json          config, loop state, ... plus `world_size` (written LAST)

Every file is written to a temp name and renamed into place, and the meta JSON lands only after
the model and all optimizer shards are on disk: a checkpoint whose meta exists is complete, and a
crash at any moment leaves either the previous checkpoint or the new one, never a half file that
loads. A checkpoint saved on N ranks resumes on M ranks: the optimizer shards are consolidated
and re-sliced on load (see load_optimizer_for_rank).

Training scripts, on every rank:
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank=rank)
    # resume:
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    optimizer.load_state_dict(load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size))
Consumers of a finished phase: model, tokenizer, meta = load_model("sft", device, phase="eval"), and
to warm-start the optimizer: load_optimizer_state("base", device, rank) (None if it was saved without one).
"""

import json
import logging
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import MissingInputError, UserError, atomic_open, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import consolidate_state_dicts, shard_state_dict
from nanochat.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

# Where each training phase writes its checkpoints, under the base dir.
CHECKPOINT_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be used (damaged, or inconsistent with its meta)."""


def log0(message):
    if int(os.environ.get("RANK", 0)) == 0:
        logger.info(message)


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


# -----------------------------------------------------------------------------
# Saving


def _current_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1



def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=None):
    """
    Write one checkpoint. Rank 0 writes the model and, last, the meta JSON; every rank that
    passes optimizer_data writes its own optimizer shard. The meta gets `world_size`, the number
    of ranks of this run (= optimizer shards to expect).
    Called on every rank with rank=<this rank> (as base_train does) in a multi-rank run with
    optimizer data, it is a collective: barriers make rank 0 wait for every shard before it marks
    the checkpoint complete. Called without rank, it writes as rank 0 and waits for no one:
    upstream's mid_train saves from rank 0 alone that way, and a barrier would hang it.
    """
    step = int(step)
    world_size = _current_world_size()
    collective = rank is not None and optimizer_data is not None and world_size > 1
    rank = 0 if rank is None else rank
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        # Re-saving a step: drop its completion mark first, so that a crash while the new files
        # are being written never pairs the old meta with new weights.
        os.remove(meta_path(checkpoint_dir, step))
    if collective:
        dist.barrier()  # no rank overwrites its shard while the old meta still vouches for it
    if rank == 0:
        path = model_path(checkpoint_dir, step)
        with atomic_open(path, "wb") as f:
            torch.save(model_data, f)
        logger.info(f"Saved model parameters to: {path}")
    if optimizer_data is not None:
        path = optim_path(checkpoint_dir, step, rank)
        with atomic_open(path, "wb") as f:
            torch.save(optimizer_data, f)
        logger.info(f"Saved optimizer state to: {path}")
    if collective:
        dist.barrier()  # every shard is on disk
    if rank == 0:
        meta = {**meta_data, "world_size": world_size}
        path = meta_path(checkpoint_dir, step)
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        logger.info(f"Saved metadata to: {path}")


# -----------------------------------------------------------------------------
# Loading files


def _torch_load(path, device):
    if not os.path.exists(path):
        raise MissingInputError(f"no checkpoint file at {path}: run the training phase first or pass --model-tag/--step")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...: all mean the same to the user
        raise CheckpointError(f"checkpoint file {path} is damaged ({type(exc).__name__}: {exc}); "
                              "delete it and resume from an earlier --step") from exc


def _load_meta(checkpoint_dir, step):
    path = meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise MissingInputError(f"no complete checkpoint at {path} (the meta JSON is written last, so this step "
                                "was never finished): pass an earlier --step")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is damaged ({type(exc).__name__}: {exc}); "
                              "delete it and resume from an earlier --step") from exc


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """
    Returns (model_data, optimizer_data or None, meta_data), tensors mapped onto device.
    load_optimizer=True reads this rank's own shard, which is only right when resuming on as many
    ranks as saved; load_optimizer_for_rank re-shards in the other cases.
    """
    step = int(step)
    if not os.path.exists(model_path(checkpoint_dir, step)):
        raise MissingInputError(f"no checkpoint at {model_path(checkpoint_dir, step)}: "
                                "run base_train first or pass --model-tag/--step")
    meta_data = _load_meta(checkpoint_dir, step)
    model_data = _torch_load(model_path(checkpoint_dir, step), device)
    optimizer_data = None
    if load_optimizer:
        optimizer_data = _torch_load(optim_path(checkpoint_dir, step, rank), device)
    return model_data, optimizer_data, meta_data


def saved_world_size(checkpoint_dir, step, meta_data=None):
    """How many ranks saved this step, i.e. how many optimizer shards it has if it has any (meta, else files)."""
    if meta_data is None:
        meta_data = _load_meta(checkpoint_dir, step)
    if "world_size" in meta_data:
        return int(meta_data["world_size"])
    # Checkpoints from upstream carry no world size: count the shard files instead.
    pattern = re.compile(rf"optim_{int(step):06d}_rank(\d+)\.pt")
    ranks = [int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := pattern.fullmatch(name))]
    return max(ranks) + 1 if ranks else 0


def _has_optimizer_state(checkpoint_dir, step, saved=None):
    """Whether this step was saved with optimizer shards (SFT and RL checkpoints are saved without)."""
    if saved is None:
        saved = saved_world_size(checkpoint_dir, step)
    return saved > 0 and os.path.exists(optim_path(checkpoint_dir, int(step), 0))


def load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size):
    """
    The optimizer state dict that `rank` of a `world_size`-rank run should pass to
    MuonAdamW.load_state_dict, whatever the number of ranks the checkpoint was saved on.
    Same number: the rank's own shard. Otherwise all saved shards are consolidated into the
    full (world-size independent) state and this rank's slice is cut from it.
    """
    step = int(step)
    saved = saved_world_size(checkpoint_dir, step)
    if not _has_optimizer_state(checkpoint_dir, step, saved):
        raise MissingInputError(f"checkpoint {meta_path(checkpoint_dir, step)} has no optimizer state "
                                "(it was saved without one): start the optimizer fresh instead")
    missing = [optim_path(checkpoint_dir, step, r) for r in range(saved)
               if not os.path.exists(optim_path(checkpoint_dir, step, r))]
    if missing:
        raise MissingInputError(f"checkpoint was saved on {saved} ranks but optimizer shards are missing: "
                                f"{', '.join(missing)}; copy them from the training machine or start the optimizer fresh")
    if saved == world_size:
        return _torch_load(optim_path(checkpoint_dir, step, rank), device)
    log0(f"Re-sharding optimizer state saved on {saved} ranks for {world_size} ranks")
    # Consolidate on the CPU: all N shards plus the full state would crowd the GPU beside the model.
    shards = [_torch_load(optim_path(checkpoint_dir, step, r), "cpu") for r in range(saved)]
    full_state = consolidate_state_dicts(shards)
    return _move_to(shard_state_dict(full_state, rank, world_size), device)


def _move_to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move_to(v, device) for v in obj)
    return obj


# -----------------------------------------------------------------------------
# Building a model from a checkpoint


def _patch_missing_config_keys(model_config):
    # Checkpoints from before sliding-window attention (and REF's mid_train) lack window_pattern:
    # they were trained with full attention everywhere.
    if "window_pattern" not in model_config:
        model_config["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config to 'L' (full attention)")


def _patch_missing_keys(model_data, model_config):
    # Checkpoints from before the per-layer residual scalars: identity residual, no x0 shortcut.
    n_layer = model_config["n_layer"]
    if "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0("Patching missing resid_lambdas in model data to 1.0")
    if "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0("Patching missing x0_lambdas in model data to 0.0")


def _strip_compile_prefix(model_data):
    # torch.compile wraps the model and prefixes every key with _orig_mod.
    return {k.replace("_orig_mod.", ""): v for k, v in model_data.items()}


def load_model_state(model, model_data):
    """
    Load a saved state dict into an initialized model (strict): drop torch.compile's `_orig_mod.`
    key prefixes and give every tensor the device and dtype this model uses (e.g. bf16 embeddings
    on CUDA, fp32 on CPU/MPS), whatever device the checkpoint was saved from.
    """
    model_data = _strip_compile_prefix(model_data)
    expected = model.state_dict()
    device = model.get_device()
    model_data = {k: v.to(device=device, dtype=expected[k].dtype) if k in expected else v for k, v in model_data.items()}
    model.load_state_dict(model_data, strict=True, assign=True)


def build_model(checkpoint_dir, step, device, phase):
    """
    Load a checkpoint into a ready GPT and the tokenizer. phase is "train" or "eval".
    Returns (model, tokenizer, meta_data).
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    model_data = _strip_compile_prefix(model_data)  # before patching, so patches see the real key names
    model_config_kwargs = dict(meta_data["model_config"])
    _patch_missing_config_keys(model_config_kwargs)
    log0(f"Building model with config: {model_config_kwargs}")
    model_config = GPTConfig(**model_config_kwargs)
    _patch_missing_keys(model_data, model_config_kwargs)

    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()  # recomputes the rotary buffers, which are not in the state dict
    load_model_state(model, model_data)
    if phase == "eval":
        model.eval()
    else:
        model.train()

    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model_config_kwargs["vocab_size"]:
        raise ValueError(f"the tokenizer in {os.path.join(get_base_dir(), 'tokenizer')} has "
                         f"{tokenizer.get_vocab_size()} tokens but the model in {checkpoint_dir} was trained with "
                         f"{model_config_kwargs['vocab_size']}: restore the tokenizer this model was trained with "
                         "(or retrain the model with the current one)")
    return model, tokenizer, meta_data


# -----------------------------------------------------------------------------
# Finding checkpoints


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: the deepest d<depth> directory, else the newest one."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingInputError(f"no checkpoints directory at {checkpoints_dir}: run base_train first")
    model_tags = [name for name in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, name))]
    if not model_tags:
        raise MissingInputError(f"no checkpoints in {checkpoints_dir}: run base_train first")
    depths = [(int(m.group(1)), tag) for tag in model_tags if (m := re.match(r"d(\d+)", tag))]
    if depths:
        return max(depths)[1]
    return max(model_tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def find_last_step(checkpoint_dir):
    """The highest step with a complete checkpoint (model file and meta JSON both present)."""
    steps = []
    if os.path.isdir(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            m = re.fullmatch(r"model_(\d+)\.pt", name)
            if m and os.path.exists(os.path.join(checkpoint_dir, f"meta_{m.group(1)}.json")):
                steps.append(int(m.group(1)))
    if not steps:
        raise MissingInputError(f"no complete checkpoint in {checkpoint_dir}: run the training phase first")
    return max(steps)


def checkpoints_dir_for(source):
    """$NANOCHAT_BASE_DIR/<phase>_checkpoints for source in base|mid|sft|rl."""
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}: choose one of {', '.join(CHECKPOINT_DIRS)}")
    return os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])


def _resolve_checkpoint(checkpoints_dir, model_tag=None, step=None):
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        available = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
        raise MissingInputError(f"no checkpoint at {checkpoint_dir}: run base_train first or pass --model-tag "
                                f"(available: {', '.join(available) or 'none'})")
    if step is None:
        step = find_last_step(checkpoint_dir)
        log0(f"No step provided, using the last step: {step}")
    return checkpoint_dir, int(step)


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    """build_model for <checkpoints_dir>/<model_tag>/step; tag defaults to the largest model, step to the last."""
    checkpoint_dir, step = _resolve_checkpoint(checkpoints_dir, model_tag, step)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, device, phase, model_tag=None, step=None):
    """Load the model of a phase (base|mid|sft|rl). Returns (model, tokenizer, meta_data)."""
    return load_model_from_dir(checkpoints_dir_for(source), device, phase, model_tag=model_tag, step=step)


def load_optimizer_state(source, device, rank, model_tag=None, step=None, world_size=None):
    """
    The optimizer state dict for `rank` of a `world_size`-rank run (default: the current run)
    from the checkpoint of a phase, re-sharded when it was saved on a different number of ranks.
    None when that checkpoint has no optimizer state, as upstream: callers start a fresh optimizer.
    """
    checkpoint_dir, step = _resolve_checkpoint(checkpoints_dir_for(source), model_tag, step)
    if world_size is None:
        world_size = _current_world_size()
    if not _has_optimizer_state(checkpoint_dir, step):
        log0(f"Optimizer checkpoint not found: {optim_path(checkpoint_dir, step, rank)}")
        return None
    log0(f"Loading optimizer state from {checkpoint_dir} with step {step}")
    return load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size)

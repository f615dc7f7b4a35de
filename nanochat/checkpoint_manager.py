"""
Checkpoints on disk, and the models built from them. One checkpoint of step S in
$NANOCHAT_BASE_DIR/<phase dir>/<model tag>/ is model_<S>.pt (rank 0), optim_<S>_rank<R>.pt (every
rank its own optimizer shard) and meta_<S>.json, written last: a step whose meta exists is complete.
Every file goes to a temp name first and is renamed into place, so a crash leaves the previous
checkpoint or the new one, never half a file that loads. Shards saved on N ranks load on M ranks
(consolidated and re-sliced). Resumable checkpoints and their pruning: nanochat/resume.py.

    model, tokenizer, meta = load_model("sft", device, phase="eval")     # a finished phase's model
"""

import json
import logging
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import ConfigError, MissingInputError, UserError, atomic_open, get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import consolidate_state_dicts, shard_state_dict
from nanochat.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

# Each training phase: the directory of its checkpoints under the base dir, and the script that writes them.
PHASES = {
    "base": ("base_checkpoints", "scripts.base_train"),
    "mid": ("mid_checkpoints", "scripts.mid_train"),
    "sft": ("chatsft_checkpoints", "scripts.chat_sft"),
    "rl": ("chatrl_checkpoints", "scripts.chat_rl"),
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


def complete_steps(checkpoint_dir):
    """Steps with a complete checkpoint (model file and meta JSON both present), oldest first."""
    names = set(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else set()
    return sorted(int(m.group(1)) for name in names
                  if (m := re.fullmatch(r"model_(\d+)\.pt", name)) and f"meta_{m.group(1)}.json" in names)


# -----------------------------------------------------------------------------
# Saving and loading files


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, collective=False):
    """
    Rank 0 writes the model and, last, the meta (with `world_size`, the shards to expect); every rank
    that passes optimizer_data writes its own shard. collective=True (called on every rank of the
    run): barriers make the meta wait for every shard. collective=False waits for no other rank.
    """
    step = int(step)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    wait_for_every_rank = collective and world_size > 1
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        os.remove(meta_path(checkpoint_dir, step))  # a re-save: the old meta must not vouch for new files
    if wait_for_every_rank:
        dist.barrier()  # no rank overwrites its shard while the old meta still vouches for it
    if rank == 0:
        with atomic_open(model_path(checkpoint_dir, step)) as f:
            torch.save(model_data, f)
    if optimizer_data is not None:
        with atomic_open(optim_path(checkpoint_dir, step, rank)) as f:
            torch.save(optimizer_data, f)
    if wait_for_every_rank:
        dist.barrier()  # every shard is on disk
    if rank == 0:
        with atomic_open(meta_path(checkpoint_dir, step), "w", encoding="utf-8") as f:
            json.dump({**meta_data, "world_size": world_size}, f, indent=2)
        log0(f"Saved checkpoint of step {step} to: {checkpoint_dir}")


def _damaged(path, error):
    return CheckpointError(f"checkpoint file {path} is damaged ({type(error).__name__}: {error}); "
                           "delete it and resume from an earlier --step")


def _torch_load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated zip, a bad pickle, ...: all mean the same to the user
        raise _damaged(path, error) from error


def load_meta(checkpoint_dir, step):
    path = meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        steps = complete_steps(checkpoint_dir)
        raise MissingInputError(f"no complete checkpoint at {path} (complete steps: "
                                f"{', '.join(map(str, steps)) or 'none'}): pass one of those")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from error


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_data, this rank's optimizer shard or None, meta), tensors on device (upstream's API)."""
    step = int(step)
    if not os.path.exists(model_path(checkpoint_dir, step)):
        raise MissingInputError(f"no checkpoint at {model_path(checkpoint_dir, step)}: pass a saved step")
    meta_data = load_meta(checkpoint_dir, step)
    if load_optimizer and not os.path.exists(optim_path(checkpoint_dir, step, rank)):
        raise MissingInputError(f"no checkpoint file at {optim_path(checkpoint_dir, step, rank)}: pass a saved step")
    optimizer_data = _torch_load(optim_path(checkpoint_dir, step, rank), device) if load_optimizer else None
    return _torch_load(model_path(checkpoint_dir, step), device), optimizer_data, meta_data


def load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size):
    """This rank's optimizer state for a world_size-rank run (None if none was saved): its own shard, or its
    slice of all shards consolidated on the CPU when they were saved on another number of ranks."""
    step = int(step)
    meta_data = load_meta(checkpoint_dir, step)
    pattern = re.compile(rf"optim_{step:06d}_rank(\d+)\.pt")
    on_disk = {int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := pattern.fullmatch(name))}
    saved_ranks = int(meta_data.get("world_size", max(on_disk, default=-1) + 1))  # upstream's meta has no world_size
    if 0 not in on_disk:
        return None
    missing = [optim_path(checkpoint_dir, step, r) for r in range(saved_ranks) if r not in on_disk]
    if missing:
        raise MissingInputError(f"checkpoint was saved on {saved_ranks} ranks but optimizer shards are missing: "
                                f"{', '.join(missing)}; copy them from the training machine or start the optimizer fresh")
    paths = [optim_path(checkpoint_dir, step, r) for r in range(saved_ranks)]
    if saved_ranks == world_size:
        return _torch_load(paths[rank], device)
    log0(f"Re-sharding optimizer state saved on {saved_ranks} ranks for {world_size} ranks")
    full_state = consolidate_state_dicts([_torch_load(path, "cpu") for path in paths])
    return shard_state_dict(full_state, rank, world_size, device=device)


# -----------------------------------------------------------------------------
# Models from checkpoints


def load_model_state(model, model_data, patch_missing_keys=False):
    """A state dict into an initialized model (strict), on its device and in its dtypes; patch_missing_keys gives
    checkpoints from before the residual scalars their neutral values (identity residual, no x0)."""
    model_data = {k.replace("_orig_mod.", ""): v for k, v in model_data.items()}
    if patch_missing_keys:
        n_layer = model.config.n_layer
        for name, value in (("resid_lambdas", torch.ones(n_layer)), ("x0_lambdas", torch.zeros(n_layer))):
            if name not in model_data:
                model_data[name] = value
                log0(f"Patching missing {name} in model data to {value[0].item()}")
    expected, device = model.state_dict(), model.get_device()
    model_data = {k: v.to(device=device, dtype=expected[k].dtype) if k in expected else v for k, v in model_data.items()}
    model.load_state_dict(model_data, strict=True, assign=True)


def config_of(meta_data, model_data):
    """The GPTConfig a checkpoint was trained with: its model_config, our model_options, its state dict's keys."""
    model_config = dict(meta_data["model_config"])
    if "window_pattern" not in model_config:  # before sliding windows, and upstream's mid_train meta: full attention
        model_config["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config to 'L' (full attention)")
    return GPTConfig.from_meta(model_config, meta_data.get("model_options"), model_data.keys())


def build_model(checkpoint_dir, step, device, phase):
    """(model, tokenizer, meta) from a checkpoint; phase "train" or "eval" sets the model's mode."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device)
    config = config_of(meta_data, model_data)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables, which are not in the state dict
    load_model_state(model, model_data, patch_missing_keys=True)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ConfigError(f"the tokenizer in {os.path.join(get_base_dir(), 'tokenizer')} has {tokenizer.get_vocab_size()} "
                          f"tokens but the model in {checkpoint_dir} was trained with {config.vocab_size}: restore the "
                          "tokenizer this model was trained with (or retrain the model with the current one)")
    return model, tokenizer, meta_data


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: the deepest d<depth> directory, else the newest one; None if none."""
    names = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
    tags = [name for name in names if os.path.isdir(os.path.join(checkpoints_dir, name))]
    depths = [(int(m.group(1)), tag) for tag in tags if (m := re.match(r"d(\d+)", tag))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)), default=None)


def find_last_step(checkpoint_dir):
    """The highest complete step of a checkpoint directory."""
    if not (steps := complete_steps(checkpoint_dir)):
        raise MissingInputError(f"no complete checkpoint in {checkpoint_dir}")
    return steps[-1]


def checkpoints_dir_for(source):
    """$NANOCHAT_BASE_DIR/<phase dir> for source in base|mid|sft|rl."""
    if source not in PHASES:
        raise ValueError(f"unknown checkpoint source {source!r}: choose one of {', '.join(PHASES)}")
    return os.path.join(get_base_dir(), PHASES[source][0])


def locate_checkpoint(source, model_tag=None, step=None):
    """
    (checkpoint_dir, step) of phase `source`: tag defaults to the largest model, step to the last
    complete one. Nothing there is one MissingInputError naming the script that writes it.
    """
    checkpoints_dir = checkpoints_dir_for(source)
    tag = model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, tag or "")
    steps = complete_steps(checkpoint_dir) if tag else []
    if not steps:
        message = f"no {source} checkpoint in {checkpoint_dir.rstrip(os.sep)}: run `python -m {PHASES[source][1]}` first"
        if model_tag and os.path.isdir(checkpoints_dir):
            message += f" or pass another model tag (there: {', '.join(sorted(os.listdir(checkpoints_dir)))})"
        others = [phase for phase in PHASES if phase != source and find_largest_model(checkpoints_dir_for(phase))]
        raise MissingInputError(message + (f" (checkpoints of other phases exist: {', '.join(others)})" if others else ""))
    if step is not None and int(step) not in steps:
        raise MissingInputError(f"no {source} checkpoint at step {step} in {checkpoint_dir} (complete steps: "
                                f"{', '.join(map(str, steps))}): pass one of those")
    return checkpoint_dir, steps[-1] if step is None else int(step)


def load_model(source, device, phase, model_tag=None, step=None):
    """The model of a finished phase (base|mid|sft|rl): (model, tokenizer, meta)."""
    checkpoint_dir, step = locate_checkpoint(source, model_tag, step)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_optimizer_state(source, device, rank, model_tag=None, step=None, world_size=None):
    """This rank's share of the optimizer state a phase saved, re-sharded as needed; None if it saved none."""
    checkpoint_dir, step = locate_checkpoint(source, model_tag, step)
    world_size = world_size or (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
    return load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size)

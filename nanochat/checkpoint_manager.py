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
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta,
                    rank=rank, collective=True)
    # resume:
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    optimizer.load_state_dict(load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size))
Consumers of a finished phase: model, tokenizer, meta = load_model("sft", device, phase="eval"), and
to warm-start the optimizer: load_optimizer_state("base", device, rank) (None if it was saved without one).
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil

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


# The script that writes each source's checkpoints, for "run X first" messages.
PHASE_SCRIPTS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
                 "rl": "scripts.chat_rl"}


def _run_first(path):
    """'run scripts.X first' for the checkpoints directory that path is in (or is)."""
    sources = {dirname: source for source, dirname in CHECKPOINT_DIRS.items()}
    parts = os.path.normpath(path).split(os.sep)
    source = next((sources[p] for p in reversed(parts) if p in sources), None)
    return f"run {PHASE_SCRIPTS[source]} first" if source else "run the training phase first"


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


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, collective=False, keep=-1):
    """
    Write one checkpoint. Rank 0 writes the model and, last, the meta JSON; every rank that
    passes optimizer_data writes its own optimizer shard. The meta gets `world_size`, the number
    of ranks of this run (= optimizer shards to expect).
    collective=True: called on every rank of the run with rank=<this rank> (as base_train does);
    in a multi-rank run, barriers make rank 0 wait for every shard before it marks the checkpoint
    complete. collective=False (the default): this call waits for no other rank; upstream's
    mid_train saves from rank 0 alone that way, and a barrier would hang it.
    keep=N > 0: once this checkpoint is complete, delete all but the newest N complete ones.
    A full disk is one clear error (DiskFullError) naming the last complete step.
    """
    step = int(step)
    world_size = _current_world_size()
    wait_for_every_rank = collective and world_size > 1
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        # Re-saving a step: drop its completion mark first, so that a crash while the new files
        # are being written never pairs the old meta with new weights.
        os.remove(meta_path(checkpoint_dir, step))
    if wait_for_every_rank:
        dist.barrier()  # no rank overwrites its shard while the old meta still vouches for it
    with _disk_full_is_one_error(checkpoint_dir, step, rank):
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
        if wait_for_every_rank:
            dist.barrier()  # every shard is on disk
        if rank == 0:
            meta = {**meta_data, "world_size": world_size}
            path = meta_path(checkpoint_dir, step)
            with atomic_open(path, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
            logger.info(f"Saved metadata to: {path}")
    if keep > 0:
        _prune(checkpoint_dir, keep, rank, wait_for_every_rank)


# -----------------------------------------------------------------------------
# Bounded disk: pruning, and a full disk as one clear error


class DiskFullError(UserError, OSError):
    """The filesystem filled up during a save; the message names the last complete checkpoint."""


def _is_disk_full(error):
    # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
    text = str(error)
    return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
            or "unexpected pos" in text)


def complete_steps(checkpoint_dir):
    """Steps with a complete checkpoint (model file and meta JSON both present), oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = re.fullmatch(r"model_(\d+)\.pt", name)
        if m and os.path.exists(os.path.join(checkpoint_dir, f"meta_{m.group(1)}.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


@contextlib.contextmanager
def _disk_full_is_one_error(checkpoint_dir, step, rank):
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not _is_disk_full(error):
            raise
        # This step is incomplete (no meta): its finished files only take space now.
        for path in ([model_path(checkpoint_dir, step)] if rank == 0 else []) + [optim_path(checkpoint_dir, step, rank)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        free_gb = shutil.disk_usage(checkpoint_dir).free / 1e9
        earlier = [s for s in complete_steps(checkpoint_dir) if s != step]
        if earlier:
            resume = (f"the last complete checkpoint is step {earlier[-1]}: free some space (or keep fewer checkpoints "
                      f"with --keep-checkpoints=1) and resume with --resume-from-step={earlier[-1]}")
        else:
            resume = "there is no complete checkpoint yet: free some space and start the run again"
        raise DiskFullError(f"out of disk space while saving step {step} to {checkpoint_dir} ({free_gb:.1f} GB free); "
                            f"{resume} (re-running speedrun.sh resumes by itself)") from None


def _checkpoint_files(checkpoint_dir):
    """{step: [paths]} of every checkpoint file in the directory, temp files of killed writes included."""
    files = {}
    pattern = re.compile(r"(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)(?:\..+\.tmp)?")
    for name in os.listdir(checkpoint_dir):
        m = pattern.fullmatch(name)
        if m:
            files.setdefault(int(m.group(1)), []).append(os.path.join(checkpoint_dir, name))
    return files


def _prune(checkpoint_dir, keep, rank, collective):
    """
    Delete every checkpoint file but those of the newest `keep` complete checkpoints (leftovers of
    killed saves too), after the newest is complete: a kill at any moment leaves that one whole. Each step loses its meta first (so a
    half-deleted step is never taken for complete), then its other files. Every rank deletes its
    own shards too (nodes without a shared filesystem); rank 0 decides which steps go.
    """
    doomed = []
    if rank == 0:
        kept = complete_steps(checkpoint_dir)[-keep:]
        doomed = sorted(s for s in _checkpoint_files(checkpoint_dir) if kept and s not in kept)
    if collective:
        shared = [doomed]
        dist.broadcast_object_list(shared, src=0)  # also a barrier: the new meta is on disk
        doomed = shared[0]
    files = _checkpoint_files(checkpoint_dir)
    for step in doomed:
        paths = files.get(step, []) if rank == 0 else [optim_path(checkpoint_dir, step, rank)]
        for path in sorted(paths, key=lambda p: not os.path.basename(p).startswith("meta_")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if rank == 0 and doomed:
        logger.info(f"Deleted checkpoints of step(s) {', '.join(map(str, doomed))} (keeping the newest {keep})")


# -----------------------------------------------------------------------------
# Loading files


def _torch_load(path, device):
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
    model_file = model_path(checkpoint_dir, step)
    if not os.path.exists(model_file):
        raise MissingInputError(f"no checkpoint at {model_file}: {_run_first(checkpoint_dir)} or pass --model-tag/--step")
    meta_data = _load_meta(checkpoint_dir, step)
    optimizer_file = optim_path(checkpoint_dir, step, rank)
    if load_optimizer and not os.path.exists(optimizer_file):
        raise MissingInputError(f"no checkpoint file at {optimizer_file}: run the training phase first "
                                "or pass --model-tag/--step")
    model_data = _torch_load(model_file, device)
    optimizer_data = _torch_load(optimizer_file, device) if load_optimizer else None
    return model_data, optimizer_data, meta_data


def _saved_shards(checkpoint_dir, step):
    """(how many ranks saved this step, the ranks whose optimizer shard is on disk): the meta and one listing."""
    meta_data = _load_meta(checkpoint_dir, step)
    pattern = re.compile(rf"optim_{step:06d}_rank(\d+)\.pt")
    on_disk = {int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := pattern.fullmatch(name))}
    # Checkpoints from upstream carry no world size: their shard files tell it
    world_size = int(meta_data["world_size"]) if "world_size" in meta_data else max(on_disk, default=-1) + 1
    return world_size, on_disk


def saved_world_size(checkpoint_dir, step):
    """How many ranks saved this step, i.e. how many optimizer shards it has if it has any."""
    return _saved_shards(checkpoint_dir, int(step))[0]


def _optimizer_shard_paths(checkpoint_dir, step):
    """
    The optimizer shard files of a step in rank order, one per rank that saved it, or [] when it
    was saved without optimizer state (SFT and RL checkpoints are). A partial set is an error.
    """
    world_size, on_disk = _saved_shards(checkpoint_dir, step)
    if 0 not in on_disk:
        return []
    missing = [optim_path(checkpoint_dir, step, r) for r in range(world_size) if r not in on_disk]
    if missing:
        raise MissingInputError(f"checkpoint was saved on {world_size} ranks but optimizer shards are missing: "
                                f"{', '.join(missing)}; copy them from the training machine or start the optimizer fresh")
    return [optim_path(checkpoint_dir, step, r) for r in range(world_size)]


def load_optimizer_for_rank(checkpoint_dir, step, device, rank, world_size):
    """
    The optimizer state dict that `rank` of a `world_size`-rank run should pass to
    MuonAdamW.load_state_dict, whatever the number of ranks the checkpoint was saved on.
    Same number: the rank's own shard. Otherwise all saved shards are consolidated into the
    full (world-size independent) state and this rank's slice is cut from it.
    """
    step = int(step)
    shard_paths = _optimizer_shard_paths(checkpoint_dir, step)
    if not shard_paths:
        raise MissingInputError(f"checkpoint {meta_path(checkpoint_dir, step)} has no optimizer state "
                                "(it was saved without one): start the optimizer fresh instead")
    return _optimizer_state_for_rank(shard_paths, device, rank, world_size)


def _optimizer_state_for_rank(shard_paths, device, rank, world_size):
    if len(shard_paths) == world_size:
        return _torch_load(shard_paths[rank], device)
    log0(f"Re-sharding optimizer state saved on {len(shard_paths)} ranks for {world_size} ranks")
    # Consolidate on the CPU: all N shards plus the full state would crowd the GPU beside the model.
    full_state = consolidate_state_dicts([_torch_load(path, "cpu") for path in shard_paths])
    return shard_state_dict(full_state, rank, world_size, device=device)


# -----------------------------------------------------------------------------
# Building a model from a checkpoint


def _patch_missing_config_keys(model_config):
    # Checkpoints from before sliding-window attention (and upstream nanochat's mid_train, whose meta
    # leaves it out) lack window_pattern: they were trained with full attention everywhere.
    if "window_pattern" not in model_config:
        model_config["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config to 'L' (full attention)")


def _patch_missing_keys(model_data, n_layer):
    # Checkpoints from before the per-layer residual scalars: identity residual, no x0 shortcut.
    if "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0("Patching missing resid_lambdas in model data to 1.0")
    if "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0("Patching missing x0_lambdas in model data to 0.0")


def _strip_compile_prefix(model_data):
    # torch.compile wraps the model and prefixes every key with _orig_mod.
    return {k.replace("_orig_mod.", ""): v for k, v in model_data.items()}


def load_model_state(model, model_data, patch_missing_keys=False):
    """
    Load a saved state dict into an initialized model (strict) and give every tensor the device and
    dtype this model uses (e.g. bf16 embeddings on CUDA, fp32 on CPU/MPS), whatever device the
    checkpoint was saved from. torch.compile's `_orig_mod.` key prefixes are dropped first, so that
    patch_missing_keys (give a checkpoint from before the residual lambdas their neutral values)
    sees the real key names, and a compiled checkpoint keeps the lambdas it saved.
    """
    model_data = _strip_compile_prefix(model_data)
    if patch_missing_keys:
        _patch_missing_keys(model_data, model.config.n_layer)
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
    model_config_kwargs = dict(meta_data["model_config"])
    _patch_missing_config_keys(model_config_kwargs)
    log0(f"Building model with config: {model_config_kwargs}")
    model_config = GPTConfig.from_meta(model_config_kwargs, meta_data.get("model_options"), model_data.keys())

    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()  # recomputes the rotary buffers, which are not in the state dict
    load_model_state(model, model_data, patch_missing_keys=True)
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
        raise MissingInputError(f"no checkpoints directory at {checkpoints_dir}: {_run_first(checkpoints_dir)}")
    model_tags = [name for name in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, name))]
    if not model_tags:
        raise MissingInputError(f"no checkpoints in {checkpoints_dir}: {_run_first(checkpoints_dir)}")
    depths = [(int(m.group(1)), tag) for tag in model_tags if (m := re.match(r"d(\d+)", tag))]
    if depths:
        return max(depths)[1]
    return max(model_tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def find_last_step(checkpoint_dir):
    """The highest step with a complete checkpoint (model file and meta JSON both present)."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise MissingInputError(f"no complete checkpoint in {checkpoint_dir}: {_run_first(checkpoint_dir)}")
    return steps[-1]


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
        raise MissingInputError(f"no checkpoint at {checkpoint_dir}: {_run_first(checkpoints_dir)} or pass --model-tag "
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
    shard_paths = _optimizer_shard_paths(checkpoint_dir, step)
    if not shard_paths:
        log0(f"Optimizer checkpoint not found: {optim_path(checkpoint_dir, step, rank)}")
        return None
    log0(f"Loading optimizer state from {checkpoint_dir} with step {step}")
    return _optimizer_state_for_rank(shard_paths, device, rank, world_size)

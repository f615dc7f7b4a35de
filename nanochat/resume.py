"""
One resume path for every training phase. save_resumable writes, on every rank, a checkpoint a run
continues from exactly: the weights, every rank's optimizer shard, and a meta with the model config,
the phase's loop state (a dataclass: add a field there and it survives a resume), every rank's data
position, the RNG and what the phase adds. Then all but the newest --keep-checkpoints complete
checkpoints go, and a full disk is one line naming the last complete step. load_resumable puts a
checkpoint back; on another number of ranks the optimizer state is re-sharded.
Meta keys upstream reads keep their names: model_config, user_config, loop_state, dataloader_state_dict.
"""

import base64
import contextlib
import dataclasses
import errno
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (
    complete_steps, config_of, load_checkpoint, load_meta, load_model_state, load_optimizer_for_rank,
    load_optimizer_state, log0, model_path, optim_path, save_checkpoint,
)
from nanochat.common import ConfigError, MissingInputError, UserError, print0


class DiskFullError(UserError, OSError):
    """The filesystem filled up during a save; the message names the last complete checkpoint."""


def _is_disk_full(error):
    # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
    text = str(error)
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "unexpected pos" in text


@contextlib.contextmanager
def _disk_full_is_one_error(checkpoint_dir, step, rank):
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not _is_disk_full(error):
            raise
        for path in ([model_path(checkpoint_dir, step)] if rank == 0 else []) + [optim_path(checkpoint_dir, step, rank)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # this step never completes: its finished files only take space now
        earlier = [s for s in complete_steps(checkpoint_dir) if s != step]
        resume = (f"the last complete checkpoint is step {earlier[-1]}: free some space (or keep fewer checkpoints with "
                  f"--keep-checkpoints=1) and resume with --resume-from-step={earlier[-1]}" if earlier
                  else "there is no complete checkpoint yet: free some space and start the run again")
        raise DiskFullError(f"out of disk space while saving step {step} to {checkpoint_dir} "
                            f"({shutil.disk_usage(checkpoint_dir).free / 1e9:.1f} GB free); {resume} "
                            "(re-running speedrun.sh resumes by itself)") from None


def _checkpoint_files(checkpoint_dir):
    """{step: [paths]} of every checkpoint file in the directory, temp files of killed writes included."""
    files = {}
    for name in os.listdir(checkpoint_dir):
        if m := re.fullmatch(r"(?:model|meta|optim)_(\d+)(?:_rank\d+)?\.(?:pt|json)(?:\..+\.tmp)?", name):
            files.setdefault(int(m.group(1)), []).append(os.path.join(checkpoint_dir, name))
    return files


def _prune(checkpoint_dir, keep, rank, collective):
    """
    Delete every checkpoint file but those of the newest `keep` complete checkpoints, once the newest
    is complete: a kill at any moment leaves that one whole. A step loses its meta first, so a
    half-deleted step is never taken for complete. Rank 0 decides; every rank deletes its own shards
    too (nodes without a shared filesystem).
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
        log0(f"Deleted checkpoints of step(s) {', '.join(map(str, doomed))} (keeping the newest {keep})")


def save_and_prune(checkpoint_dir, step, model_data, optimizer_data, meta, rank=0, collective=False, keep=-1):
    """save_checkpoint with a full disk as one DiskFullError, then all but the newest `keep` (-1: all) go."""
    with _disk_full_is_one_error(checkpoint_dir, step, rank):
        save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta, rank=rank, collective=collective)
    if keep > 0:
        _prune(checkpoint_dir, keep, rank, collective and dist.is_available() and dist.is_initialized())


# -----------------------------------------------------------------------------
# The checkpoint a run resumes from


def _rng_state(device):
    def encode(tensor):
        return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")

    state = {"cpu": encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = encode(torch.cuda.get_rng_state(device))
    return state


def _restore_rng(state, device):
    def decode(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode(state["cuda"]), device)


def save_resumable(checkpoint_dir, step, model, optimizer, loop, loader_state, runtime, keep=-1, **meta):
    """On every rank: the checkpoint of this step (see the module docstring); meta: the phase's own keys."""
    loader_states = [loader_state]
    if runtime.ddp:
        loader_states = [None] * runtime.world_size
        dist.all_gather_object(loader_states, loader_state)
    meta = {**meta, "step": step, **model.config.meta_entries(), "loop_state": dataclasses.asdict(loop),
            "dataloader_state_dict": loader_states[0], "dataloader_state_dicts": loader_states,
            "rng_state": _rng_state(runtime.device)}
    save_and_prune(checkpoint_dir, step, model.state_dict(), optimizer.state_dict(), meta,
                   rank=runtime.rank, collective=True, keep=keep)


def load_resumable(checkpoint_dir, step, model, loop_class, runtime):
    """
    The checkpoint of `step` into `model` (built with this run's flags: they must give the same
    config); the RNG restored. Returns (meta, loop state, every saved rank's loader state). Fields
    the saved loop state lacks (an upstream checkpoint, an older one) keep their defaults.
    """
    print0(f"Resuming from step {step} of {checkpoint_dir}")
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, runtime.device)
    saved_config = config_of(meta, model_data)
    if saved_config != model.config:
        raise ConfigError(f"the checkpoint at step {step} is a model {saved_config}, but this run builds {model.config}: "
                          "resume with the flags (or the --model-tag) of the original run")
    load_model_state(model, model_data)
    if "rng_state" in meta:
        _restore_rng(meta["rng_state"], runtime.device)
    known = {f.name for f in dataclasses.fields(loop_class)}
    loop = loop_class(**{k: v for k, v in meta.get("loop_state", {}).items() if k in known})
    loader_states = meta.get("dataloader_state_dicts") or meta.get("loader_states") or [meta.get("dataloader_state_dict")]
    if len(loader_states) != runtime.world_size:
        print0(f"Resuming a {len(loader_states)}-rank run on {runtime.world_size} ranks: the optimizer state is "
               "re-sharded and the unread data re-dealt")
    return meta, loop, loader_states


def check_resume_step(checkpoint_dir, step):
    """A --resume-from-step that names no complete checkpoint is one line listing the ones there are."""
    try:
        load_meta(checkpoint_dir, step)
    except MissingInputError as error:
        raise MissingInputError(f"--resume-from-step={step}: {error}") from None


def load_resumable_optimizer(optimizer, checkpoint_dir, step, runtime):
    state = load_optimizer_for_rank(checkpoint_dir, step, runtime.device, runtime.rank, runtime.world_size)
    if state is None:
        raise ConfigError(f"the checkpoint of step {step} in {checkpoint_dir} has no optimizer state to resume with")
    optimizer.load_state_dict(state)


def warm_start_optimizer(optimizer, source, runtime, model_tag=None, step=None):
    """
    The optimizer state (momentum, second moments) that phase `source` saved, with this run's
    hyperparameters kept. Returns False, after saying so, when that checkpoint has none.
    """
    state = load_optimizer_state(source, runtime.device, runtime.rank, model_tag=model_tag, step=step,
                                 world_size=runtime.world_size)
    if state is None:
        print0(f"The {source} checkpoint has no optimizer state: starting the optimizer fresh")
        return False
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, hyperparameters):
        group.update(own)
    print0(f"Warm-started the optimizer from the {source} checkpoint (learning rates reset to this run's)")
    return True

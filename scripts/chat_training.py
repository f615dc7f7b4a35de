"""
What the chat training phases (scripts.mid_train, scripts.chat_sft) share; scripts.chat_rl uses the
flags, optimizer and wandb helpers (its checkpoints carry other loop state). The device setup is
nanochat.training.init_runtime.

    phase_parser / add_source_flags / add_optimizer_flags / add_checkpoint_flags
                                      the flags all three phases have, with the same names and help
    load_source_model(source, ...)    the checkpoint a phase starts from; missing = which phase to run
    build_optimizer(args, model)      Muon + AdamW with every LR scaled by --init-lr-frac
    save_resumable_checkpoint / load_resume_checkpoint
                                      weights, every rank's optimizer shard, every rank's loader
                                      state, the RNG and the loop state; a resume on another number
                                      of ranks re-shards the optimizer and re-deals the data
    warm_start_optimizer              another phase's optimizer state, with this run's LRs
"""

import argparse
import base64
import dataclasses
import os
import re

import torch
import torch.distributed as dist

from nanochat.chat_data import loader_state_for_rank
from nanochat.checkpoint_manager import (
    PHASE_SCRIPTS, checkpoints_dir_for, find_largest_model, find_last_step, load_checkpoint, load_model, load_model_state,
    load_optimizer_for_rank, load_optimizer_state, meta_path, save_checkpoint,
)
from nanochat.common import ConfigError, MissingInputError, print0
from nanochat.gpt import GPTConfig
from nanochat.precision import add_dtype_flag
from nanochat.training import add_keep_checkpoints_flag



# -----------------------------------------------------------------------------
# The flags every post-training phase has


def phase_parser(description):
    """A parser that opens with the wandb run and the device; --help shows every default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    add_dtype_flag(parser)
    return parser


def add_source_flags(parser, what):
    parser.add_argument("--model-tag", type=str, default=None,
                        help=f"{what} to load, and the name of the output directory (default: the largest; output d<depth>)")
    parser.add_argument("--model-step", type=int, default=None, help=f"step of the {what} to load (default: its last)")


def add_optimizer_flags(parser, init_lr_frac, init_lr_note=""):
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of wte and value embeddings")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (not scheduled)")
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="every LR is multiplied by this" + init_lr_note)


def add_checkpoint_flags(parser, save_every=-1):
    parser.add_argument("--save-every", type=int, default=save_every, help="also save every N steps, to resume from (-1 = only at the end)")
    parser.add_argument("--resume-from-step", type=int, default=-1,
                        help="resume this run from its checkpoint at this step (-1 = start fresh)")
    add_keep_checkpoints_flag(parser)


def synchronize_flags(values, runtime):
    """The element-wise max over ranks of a few floats (stop flags, progress), so every rank decides alike."""
    if not runtime.ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


# -----------------------------------------------------------------------------
# The source model


def load_source_model(source, device, model_tag=None, step=None):
    """load_model(source, phase="train"), except that a missing checkpoint is one line naming the phase that writes it."""
    checkpoints_dir = checkpoints_dir_for(source)
    try:
        tag = model_tag or find_largest_model(checkpoints_dir)
        last_step = find_last_step(os.path.join(checkpoints_dir, tag))
    except MissingInputError:
        where = os.path.join(checkpoints_dir, model_tag) if model_tag else checkpoints_dir
        raise MissingInputError(f"no {source} checkpoint in {where}: run `python -m {PHASE_SCRIPTS[source]}` first"
                                + ("" if model_tag is None else " or pass another --model-tag")) from None
    step = last_step if step is None else step
    if not os.path.exists(meta_path(os.path.join(checkpoints_dir, tag), step)):
        raise MissingInputError(f"no {source} checkpoint at step {step} in {os.path.join(checkpoints_dir, tag)} "
                                f"(the last one is step {last_step}): pass an existing --model-step")
    return load_model(source, device, phase="train", model_tag=tag, step=step)


def build_optimizer(args, model):
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]  # the schedules scale this
    return optimizer


# -----------------------------------------------------------------------------
# Checkpoints that resume


def _encode_tensor(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_tensor(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device):
    state = {"cpu": _encode_tensor(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode_tensor(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state, device):
    torch.set_rng_state(_decode_tensor(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_decode_tensor(state["cuda"]), device)


def saved_steps(checkpoint_dir):
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", name)))


def save_resumable_checkpoint(checkpoint_dir, step, model, optimizer, loop, loader_state, meta, runtime, keep=-1):
    """
    On every rank: weights (rank 0), this rank's optimizer shard, and a meta with the full model
    config, the loop state (a dataclass), every rank's loader state and the RNG state; then all
    but the newest `keep` checkpoints go (keep=-1: none).
    """
    loader_states = [loader_state]
    if runtime.ddp:
        loader_states = [None] * runtime.world_size
        dist.all_gather_object(loader_states, loader_state)
    meta = {**meta, "step": step, "model_config": dict(model.config.__dict__), "loop_state": dataclasses.asdict(loop),
            "loader_states": loader_states, "rng_state": rng_state(runtime.device)}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer.state_dict(), meta,
                    rank=runtime.rank, collective=True, keep=keep)


def check_resume_step(checkpoint_dir, step):
    """A --resume-from-step that names no complete checkpoint is one line listing the ones there are."""
    if not os.path.exists(meta_path(checkpoint_dir, step)):
        steps = saved_steps(checkpoint_dir)
        there = f"saved steps: {', '.join(map(str, steps))}" if steps else "none saved yet"
        raise MissingInputError(f"--resume-from-step={step}: no checkpoint at {meta_path(checkpoint_dir, step)} ({there})")


def load_resume_checkpoint(checkpoint_dir, step, model, runtime):
    """Weights into the model, the RNG restored; returns (meta, this rank's loader state)."""
    check_resume_step(checkpoint_dir, step)
    print0(f"Resuming from step {step} of {checkpoint_dir}")
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, runtime.device, load_optimizer=False)
    saved_config = GPTConfig(**meta["model_config"])
    if saved_config != model.config:
        raise ConfigError(f"the checkpoint at step {step} is a model {saved_config}, but the source model is "
                          f"{model.config}; resume with the --model-tag of the original run")
    load_model_state(model, model_data)
    restore_rng(meta["rng_state"], runtime.device)
    if len(meta["loader_states"]) != runtime.world_size:
        print0(f"Resuming a {len(meta['loader_states'])}-rank run on {runtime.world_size} ranks: the optimizer state is "
               "re-sharded and the unread data re-dealt")
    return meta, loader_state_for_rank(meta["loader_states"], runtime.rank, runtime.world_size)


def load_resume_optimizer(optimizer, checkpoint_dir, step, runtime):
    optimizer.load_state_dict(load_optimizer_for_rank(checkpoint_dir, step, runtime.device, runtime.rank,
                                                      runtime.world_size))


def restore_loop_state(loop_class, meta):
    return loop_class(**meta["loop_state"])


def warm_start_optimizer(optimizer, source, runtime, model_tag=None, step=None):
    """
    Load the optimizer state (momentum and second-moment buffers) that phase `source` saved with its
    checkpoint, keeping this run's hyperparameters (learning rates, momentum, weight decay).
    Returns False, after saying so, when that checkpoint has no optimizer state.
    """
    state = load_optimizer_state(source, runtime.device, runtime.rank, model_tag=model_tag, step=step,
                                 world_size=runtime.world_size)
    if state is None:
        print0(f"The {source} checkpoint has no optimizer state: starting the optimizer fresh")
        return False
    hyperparameters = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, hyperparameters):
        group.update(own)
    print0(f"Warm-started the optimizer from the {source} checkpoint (learning rates reset to this run's)")
    return True

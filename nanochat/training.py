"""
What every training phase (base_train, mid_train, chat_sft, chat_rl) shares: the runtime (device,
ranks, peak FLOP/s, the attention backend, refused when it would be slow), the model for a depth,
the weight update with fp16 loss scaling, the GC policy, device synchronisation and wandb.
"""

import argparse
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import flash_attention
from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, DummyWandb, UserError, autodetect_device_type, compute_init, get_peak_flops, print0,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import add_dtype_flag

# -----------------------------------------------------------------------------
# Runtime


@dataclass
class Runtime:
    device_type: str
    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    peak_flops: float
    attention: str = "sdpa"  # the attention backend that runs: "fa3" or "sdpa"


def init_runtime(device_type):
    """
    Pick the device (empty = autodetect), join the process group under torchrun, find the peak
    FLOP/s for MFU, and say which attention backend runs: on SM 9.0+ GPUs SDPA stops the run
    (flash_attention.require_fast_attention) unless NANOCHAT_ALLOW_SDPA=1.
    """
    device_type = device_type or autodetect_device_type()
    attention = flash_attention.require_fast_attention(device_type)
    ddp, rank, _, world_size, device = compute_init(device_type)
    peak_flops = float("inf")  # MFU is only meaningful on a GPU
    if device_type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        peak_flops = get_peak_flops(gpu_name)
        print0(f"GPU: {gpu_name} | peak bf16 FLOP/s: {peak_flops:.3e}")
    print0(f"Compute dtype: {COMPUTE_DTYPE}")
    print0(f"Attention: {attention.backend} ({attention.reason})")
    return Runtime(device_type, ddp, rank, world_size, device, peak_flops, attention.backend)


def synchronize(device):
    """Wait for the device, so that host timers measure its work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def add_keep_checkpoints_flag(parser):
    """--keep-checkpoints N: each save deletes all but the newest N complete checkpoints (-1 keeps every one)."""
    def count(text):
        value = int(text)
        if value == 0 or value < -1:
            raise argparse.ArgumentTypeError(f"must be -1 (keep all) or at least 1, got {value}")
        return value
    parser.add_argument("--keep-checkpoints", type=count, default=-1,
                        help="keep only the newest N complete checkpoints, deleting older ones after each save (-1 = keep all)")


# -----------------------------------------------------------------------------
# What the post-training phases (mid_train, chat_sft, chat_rl) share


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


def all_reduce_floats(values, runtime, op=dist.ReduceOp.SUM):
    """A few floats reduced element-wise over the ranks (sums of counts; MAX: stop flags every rank agrees on)."""
    if not runtime.ddp:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def build_post_training_optimizer(args, model):
    """The optimizer of mid_train, chat_sft and chat_rl: every LR scaled by --init-lr-frac (the schedules scale initial_lr)."""
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]  # the schedules scale this
    return optimizer


# -----------------------------------------------------------------------------
# wandb


def wandb_login_problem(run_name, environ=os.environ):
    """
    Why wandb.init would fail for --run=run_name, or None. wandb reads its key from WANDB_API_KEY or
    the netrc file `wandb login` writes; WANDB_MODE=offline/disabled needs none.
    """
    if run_name == "dummy" or environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return None
    if environ.get("WANDB_API_KEY"):
        return None
    host = environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    home = environ.get("HOME") or os.path.expanduser("~")
    netrc_path = environ.get("NETRC") or os.path.join(home, ".netrc")
    try:
        import netrc
        if netrc.netrc(netrc_path).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"--run={run_name} (WANDB_RUN) logs to wandb, but this machine has no wandb login: run `wandb login` "
            "(or set WANDB_API_KEY), set WANDB_MODE=offline to log locally, or use --run=dummy for no wandb")


def init_wandb(project, run_name, config, rank):
    """A wandb run on rank 0 (a stand-in elsewhere, or with --run=dummy); a missing login is one clear error."""
    if run_name == "dummy" or rank != 0:
        return DummyWandb()
    problem = wandb_login_problem(run_name)
    if problem:
        raise ConfigError(problem)
    import wandb

    try:
        return wandb.init(project=project, name=run_name, config=config)
    except (wandb.errors.UsageError, wandb.errors.CommError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"wandb could not start run {run_name!r}: {first_line}; check `wandb login`, "
                        "or set WANDB_MODE=offline") from None


# -----------------------------------------------------------------------------
# The model for a depth


# base_train's defaults: the shape every depth of the miniseries shares
ASPECT_RATIO = 64
HEAD_DIM = 128
MAX_SEQ_LEN = 2048
WINDOW_PATTERN = "SSSL"


def model_config_for_depth(depth, vocab_size, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM, max_seq_len=MAX_SEQ_LEN,
                           window_pattern=WINDOW_PATTERN, recipe="latest"):
    """
    The GPTConfig that --depth sets: width = depth * aspect_ratio rounded up to a multiple of head_dim,
    so heads are exactly head_dim wide. Returns (config, width before rounding).
    """
    if depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {depth}")
    if max_seq_len < 1:
        raise ConfigError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"--head-dim must be a positive even number (RoPE rotates pairs), got {head_dim}")
    base_dim = depth * aspect_ratio
    if base_dim < 1:
        raise ConfigError(f"--aspect-ratio must be >= 1, got {aspect_ratio}")
    model_dim = math.ceil(base_dim / head_dim) * head_dim
    num_heads = model_dim // head_dim
    return GPTConfig.for_recipe(
        recipe, sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth,
        n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern,
    ), base_dim


def build_model(config, device):
    """A GPT with freshly initialized weights on device (built on the meta device first: no wasted init)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


# -----------------------------------------------------------------------------
# The step


def update_weights(model, optimizer, scaler, ddp):
    """The optimizer step (through the loss scaler under fp16), then the gradients cleared; every phase's update."""
    if scaler:
        step_with_loss_scaling(scaler, optimizer, ddp)
    else:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def step_with_loss_scaling(scaler, optimizer, ddp):
    """
    fp16: unscale, agree across ranks on whether any rank saw inf/nan (MuonAdamW averages
    gradients inside step(), so every rank must skip or step together, and every rank's scaler
    must shrink or grow alike), then step.
    """
    scaler.unscale_(optimizer)
    found_inf_tensors = list(scaler._found_inf_per_device(optimizer).values())  # GradScaler keeps no public handle
    found_inf = torch.stack([t.float() for t in found_inf_tensors]).max()
    if ddp:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    for t in found_inf_tensors:
        t.copy_(found_inf)
    if found_inf.item() == 0:
        optimizer.step()
    scaler.update()


def manage_garbage_collection(step, first_step):
    """
    Python's cyclic GC pauses ~0.5 s at a time at this allocation rate while freeing almost
    nothing (upstream measured this and turned it off). After the first step of this process (0,
    or the resume step) collect the setup garbage, freeze what survives and turn automatic
    collection off; then collect by hand every 5000 steps.
    """
    if step == first_step:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()


# -----------------------------------------------------------------------------
# Schedules: each returns the multiplier of every group's initial LR at a step


def warmup_warmdown_lr(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """base_train and chat_sft: linear warmup, flat, then linear warmdown to final_lr_frac."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final_lr_frac


def late_decay_lr(progress):
    """mid_train, by the fraction of its data consumed: flat for the first 80%, then linear to 0."""
    return 1.0 if progress < 0.8 else max(0.0, 1 - (progress - 0.8) / 0.2)


def linear_decay_lr(step, num_steps):
    """chat_rl: linear from 1 at the first step to 0 at the end."""
    return 1.0 - step / num_steps


def muon_momentum(it):
    """Muon's momentum warmup of the 2026-01 recipe: 0.85 -> 0.95 over the first 300 steps."""
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def muon_momentum_2026_07(it, num_iterations, warmdown_ratio):
    """Recipe 2026-07: 0.85 -> 0.97 over the first 400 steps, then down to 0.90 over the LR warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    if it >= warmdown_start and warmdown_iters > 0:
        return 0.97 + (0.90 - 0.97) * (it - warmdown_start) / warmdown_iters
    return 0.97


def weight_decay_factor(it, num_iterations, recipe):
    """Muon's weight decay over the run, as a fraction of its start: linear to 0 (2026-01) or cosine to 0 (2026-07)."""
    if recipe == "2026-01":
        return 1 - it / num_iterations
    return 0.5 * (1 + math.cos(math.pi * it / num_iterations))

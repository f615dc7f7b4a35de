"""
The plan of a pretraining run, derived from base_train's flags and the model before the first
step: tokens per step (given, or derived from the data size), gradient accumulation, the LR scale
for the batch, Muon's weight decay for the depth, and the horizon in steps. Printed as decided;
flags that cannot work fail here, at start.
"""

import math
from dataclasses import dataclass

import torch

from nanochat.common import ConfigError, print0
from nanochat.gpt import GPT, resolve_recipe
from nanochat.training import model_config_for_depth

REFERENCE_BATCH_SIZE = 2**19  # tokens per step at which the learning rates were tuned (d12)

# base_train's defaults per recipe (--recipe): upstream's 2026-01 snapshot, and its 2026-07 recipe
# (autoresearch rounds 1-2 and the data:param ratio re-fit to 12; its time-to-GPT-2 runs).
RECIPE_DEFAULTS = {
    "2026-01": dict(target_param_data_ratio=10.5, total_batch_size=524288, unembedding_lr=0.004, weight_decay=0.2,
                    warmup_steps=0, warmdown_ratio=0.5, final_lr_frac=0.0, eval_tokens=20 * 524288),
    "2026-07": dict(target_param_data_ratio=12.0, total_batch_size=-1, unembedding_lr=0.008, weight_decay=0.28,
                    warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, eval_tokens=80 * 524288),
}


def apply_recipe_defaults(args):
    """args.recipe resolved to its name, and every flag left unset (None) given that recipe's default."""
    args.recipe = resolve_recipe(args.recipe)
    for name, value in RECIPE_DEFAULTS[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def scaling_params(model):
    """Kaplan-style parameter count used for the horizon: transformer matrices + lm_head (LOG 2026-01-27)."""
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def reference_scaling_params(args, vocab_size):
    """The scaling params of d12, where the batch size and LRs were tuned (the same recipe and context)."""
    config, _ = model_config_for_depth(12, vocab_size, max_seq_len=args.max_seq_len, window_pattern=args.window_pattern,
                                       recipe=args.recipe)
    with torch.device("meta"):
        return scaling_params(GPT(config))


def auto_total_batch_size(args, num_scaling_params, vocab_size):
    """
    Power Lines (arXiv 2505.13738): the best batch grows as data^0.383. Anchored at d12 with
    2^19 tokens at the same tokens:params ratio, rounded to a power of two.
    """
    if args.target_param_data_ratio <= 0:
        raise ConfigError("--total-batch-size=-1 derives the batch from --target-param-data-ratio; set a ratio > 0 or pass an explicit --total-batch-size")
    data_ratio = num_scaling_params / reference_scaling_params(args, vocab_size)  # D / D_ref at a fixed tokens:params ratio
    return 2 ** round(math.log2(REFERENCE_BATCH_SIZE * data_ratio**0.383)), data_ratio


def compute_num_iterations(args, flops_per_token, num_scaling_params, total_batch_size):
    """
    The horizon in optimizer steps and the console line that announces it (upstream's wording:
    the orchestrators grep "Calculated number of iterations").
    """
    if args.num_iterations > 0:
        return args.num_iterations, "Using user-provided number of iterations"
    if args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
        return num_iterations, "Calculated number of iterations from target FLOPs"
    if args.target_param_data_ratio > 0:
        num_iterations = int(args.target_param_data_ratio * num_scaling_params) // total_batch_size
        return num_iterations, "Calculated number of iterations from target data:param ratio"
    raise ConfigError("no training horizon: set one of --num-iterations, --target-flops or --target-param-data-ratio")


@dataclass
class TrainingPlan:
    """Everything derived from the flags and the model before the first step."""
    total_batch_size: int  # tokens per optimizer step, all ranks
    grad_accum_steps: int
    eval_steps: int  # micro-batches per val bpb evaluation
    batch_lr_scale: float
    weight_decay: float  # Muon's, before its linear decay to 0 over the run
    num_iterations: int
    flops_per_token: float
    num_scaling_params: int

    @property
    def total_tokens(self):
        return self.total_batch_size * self.num_iterations


def plan_training(args, model, vocab_size, world_size):
    """Batch size, gradient accumulation, LR scale, weight decay and horizon; fails early on flags that cannot work."""
    num_scaling_params = scaling_params(model)
    flops_per_token = model.estimate_flops()
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size, data_ratio = auto_total_batch_size(args, num_scaling_params, vocab_size)
        print0(f"Auto total batch size: {total_batch_size:,} tokens")
    elif total_batch_size <= 0:
        raise ConfigError(f"--total-batch-size must be positive (or -1 for auto), got {total_batch_size}")
    else:
        data_ratio = num_scaling_params / reference_scaling_params(args, vocab_size)
    if args.recipe == "2026-01" and args.total_batch_size != -1:
        weight_decay = args.weight_decay * (12 / args.depth) ** 2  # optimal WD ~ 1/width^2 (upstream LOG 2026-01-10)
    else:
        # constant T_epoch = B / (lr * wd * D) (arXiv 2405.13698), with lr ~ sqrt(B): wd ~ sqrt(B / B_ref) * D_ref / D
        weight_decay = args.weight_decay * math.sqrt(total_batch_size / REFERENCE_BATCH_SIZE) / data_ratio
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if args.device_batch_size < 1 or total_batch_size % world_tokens_per_fwdbwd != 0:
        raise ConfigError(
            f"--total-batch-size={total_batch_size} must be a positive multiple of device_batch_size * max_seq_len * world_size "
            f"= {args.device_batch_size} * {args.max_seq_len} * {world_size} = {world_tokens_per_fwdbwd}; "
            f"change --total-batch-size or --device-batch-size")
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    eval_steps = args.eval_tokens // world_tokens_per_fwdbwd
    if args.eval_every > 0 and eval_steps == 0:
        raise ConfigError(f"--eval-tokens={args.eval_tokens} is less than one evaluation batch ({world_tokens_per_fwdbwd} tokens); raise it or pass --eval-every=-1")
    batch_lr_scale = math.sqrt(total_batch_size / REFERENCE_BATCH_SIZE)
    if batch_lr_scale != 1.0:
        print0(f"Scaling learning rates by sqrt({total_batch_size}/{REFERENCE_BATCH_SIZE}) = {batch_lr_scale:.4f}")
    print0(f"Muon weight decay: {weight_decay:.6f}")

    num_iterations, horizon_line = compute_num_iterations(args, flops_per_token, num_scaling_params, total_batch_size)
    if num_iterations < 1:
        raise ConfigError(f"{horizon_line}: {num_iterations}; a run needs at least 1 step: raise the target or pass --num-iterations")
    if args.resume_from_step > num_iterations:
        # the loop stops when step == num_iterations, so it would never stop
        raise ConfigError(f"--resume-from-step={args.resume_from_step} is past the end of this run ({num_iterations} steps); "
                          "resume with the horizon flags of the original run or a longer horizon")
    plan = TrainingPlan(total_batch_size, grad_accum_steps, eval_steps, batch_lr_scale, weight_decay,
                        num_iterations, flops_per_token, num_scaling_params)
    print0(f"{horizon_line}: {num_iterations:,}")
    print0(f"Total number of training tokens: {plan.total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {plan.total_tokens / num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * plan.total_tokens:e}")
    return plan

"""
Pretrain a base model on the ClimbMix shards (--dataset fineweb: FineWeb-Edu; or the offline
corpus standing in for either). One dial, --depth, sets the model (width = depth * aspect_ratio
nudged up to a multiple of --head-dim, heads = width / head_dim); the learning rates, weight
decay and horizon derived from it are printed at start-up.

Run it:
    python -m scripts.base_train --depth=12                                   # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 \
        --eval-tokens=512 --core-metric-every=-1 --total-batch-size=512 --num-iterations=20   # CPU
    python -m scripts.base_train --depth=4 ... --resume-from-step=10          # continue a run

Reads  the --dataset's shards ($NANOCHAT_BASE_DIR/base_data_climbmix/ or base_data/), tokenizer/,
       and the CORE eval bundle when --core-metric-every is on (by default only on CUDA; README.md, "CORE").
Writes $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/{model,meta,optim}_<step>.*, summary.json beside
       them (what miniseries.sh, scaling_laws.sh and nanochat.plots read: nanochat/run_summary.py)
       and the "Base model training" report section.
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse
import importlib
import time
from dataclasses import dataclass

import torch

from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, compile_enabled, compute_cleanup, get_base_dir, parse_flags, print0, print_banner, run_script,
)
from nanochat.dataloader import (
    tokenizing_distributed_data_loader_bos_bestfit,
    tokenizing_distributed_data_loader_with_state_bos_bestfit,
)
from nanochat.dataset import add_dataset_flag, use_dataset
from nanochat.fp8 import FP8_RECIPES, check_fp8_support, convert_to_fp8, disable_fp8
from nanochat.loss_eval import SAMPLE_PROMPTS, evaluate_bpb
from nanochat.report import get_report
from nanochat.resume import load_resumable, load_resumable_optimizer, save_resumable
from nanochat.run_summary import base_run_summary, history_before, read_summary, summary_path, write_summary
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (
    ASPECT_RATIO, HEAD_DIM, MAX_SEQ_LEN, WINDOW_PATTERN, add_keep_checkpoints_flag, build_model, init_runtime, init_wandb,
    manage_garbage_collection, model_config_for_depth, muon_momentum, muon_momentum_2026_07, synchronize, update_weights,
    warmup_warmdown_lr, weight_decay_factor,
)
from nanochat.training_plan import apply_recipe_defaults, plan_training, scaling_params

CUDA_CORE_METRIC_EVERY = 2000  # upstream's default cadence; on CPU/MPS a CORE evaluation takes too long to be on by default


def parse_args(argv=None):
    unset = " (default: by --recipe, see nanochat/training_plan.py)"
    parser = argparse.ArgumentParser(description="Pretrain a base model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # logging and hardware
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    add_dataset_flag(parser)  # recorded in the checkpoint's user_config and the report
    parser.add_argument("--fp8", action="store_true", help="run the large matmuls in fp8 through torchao (needs a GPU with fp8 tensor cores: H100, L4, ...)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=FP8_RECIPES,
                        help="fp8 scaling: tensorwise (one scale per tensor, faster) or rowwise (one per row, more accurate, slower)")
    # the recipe: model options, optimizer and the defaults marked "by recipe"
    parser.add_argument("--recipe", type=str, default="latest", choices=["2026-01", "2026-07", "latest"],
                        help="2026-07 (= latest): upstream's 2026 recipe (smear, backout, MuonEq/Muon+, the schedules "
                             "below); 2026-01: its January snapshot, which the published numbers of the seeds used")
    # model shape
    parser.add_argument("--depth", type=int, default=20, help="number of transformer layers; sets every other dimension")
    parser.add_argument("--aspect-ratio", type=int, default=ASPECT_RATIO, help="model_dim = depth * aspect_ratio (nudged up to a multiple of head_dim)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="target attention head dimension")
    parser.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN, help="context length")
    parser.add_argument("--window-pattern", type=str, default=WINDOW_PATTERN, help="sliding-window pattern over layers (S=half context, L=full); last layer is always L")
    # horizon: the first one that is set wins (unset = the recipe's default)
    parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (-1 = derive)")
    parser.add_argument("--target-flops", type=float, default=-1.0, help="derive steps from a total FLOPs budget (-1 = off)")
    parser.add_argument("--target-param-data-ratio", type=float, default=None, help=f"derive steps from tokens:scaling-params (-1 = off){unset}")
    # batch
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per rank")
    parser.add_argument("--total-batch-size", type=int, default=None, help=f"tokens per optimizer step (-1 = derive from the data size){unset}")
    # optimization
    parser.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of wte and value embeddings")
    parser.add_argument("--unembedding-lr", type=float, default=None, help=f"AdamW LR of lm_head{unset}")
    parser.add_argument("--weight-decay", type=float, default=None, help="Muon cautious weight decay at d12, scaled by (12/depth)^2 under "
                        f"2026-01 with a given batch, else by batch and data size{unset}")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    parser.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the residual scalars")
    parser.add_argument("--adam-beta1", type=float, default=None, help="AdamW beta1 of every group (recipe 2026-01 only; default 0.8)")
    parser.add_argument("--adam-beta2", type=float, default=None, help="AdamW beta2 of every group (recipe 2026-01 only; default 0.95)")
    parser.add_argument("--muon-eq", action=argparse.BooleanOptionalAction, default=None,
                        help="MuonEq: equilibrate rows before the polar iteration (default: the recipe's, on in 2026-07)")
    parser.add_argument("--muon-plus", action=argparse.BooleanOptionalAction, default=None,
                        help="Muon+: renormalize the update to sqrt(min(m, n)) (default: the recipe's, on in 2026-07)")
    parser.add_argument("--warmup-steps", type=int, default=None, help=f"steps of linear LR warmup{unset}")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup (wins over --warmup-steps when > 0)")
    parser.add_argument("--warmdown-ratio", type=float, default=None, help=f"fraction of steps of linear LR warmdown at the end{unset}")
    parser.add_argument("--final-lr-frac", type=float, default=None, help=f"LR at the end as a fraction of the initial LR{unset}")
    parser.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = start fresh)")
    # evaluation, sampling, saving
    parser.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = off)")
    parser.add_argument("--eval-tokens", type=int, default=None, help=f"tokens of val data per bpb evaluation{unset}")
    parser.add_argument("--core-metric-every", type=int, default=None,
                        help=f"CORE metric every N steps and at the last step (-1 = off; default {CUDA_CORE_METRIC_EVERY} on CUDA, off on CPU/MPS)")
    parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    parser.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1 = off)")
    parser.add_argument("--save-every", type=int, default=-1, help="save every N steps (-1 = only at the end)")
    add_keep_checkpoints_flag(parser)
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
    return apply_recipe_defaults(parse_flags(parser, argv))


def model_config_for_args(args, vocab_size):
    return model_config_for_depth(args.depth, vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len,
                                  args.window_pattern, recipe=args.recipe)


# -----------------------------------------------------------------------------
# Setup: devices, the model and the training plan, each printed as it is decided


def setup_runtime(args):
    """init_runtime, then a word on SDPA's cost for sliding windows (only this phase has --window-pattern)."""
    runtime = init_runtime(args.device_type)
    if runtime.attention == "sdpa":
        if args.window_pattern.upper() != "L":
            print0(f"WARNING: SDPA runs the sliding windows of --window-pattern={args.window_pattern} with explicit masks, "
                   "which is slow; consider --window-pattern=L.")
    return runtime


def build_and_describe_model(args, vocab_size, device):
    """The model for --depth, initialized; prints its shape, parameter counts and FLOPs per token."""
    config, base_dim = model_config_for_args(args, vocab_size)
    nudge = f" (nudged up from {base_dim})" if config.n_embd != base_dim else ""
    print0(f"Recipe: {args.recipe}")
    print0(f"num_layers: {config.n_layer}")
    print0(f"model_dim: {config.n_embd}{nudge}")
    print0(f"num_heads: {config.n_head}")
    print0(f"head_dim: {config.n_embd // config.n_head}")
    print0(f"num_kv_heads: {config.n_kv_head}")
    model = build_model(config, device)
    print0("Parameter counts:")
    for key, value in model.num_scaling_params().items():
        print0(f"{key:24s}: {value:,}")
    print0(f"Scaling parameters (transformer matrices + lm_head): {scaling_params(model):,}")
    print0(f"Estimated FLOPs per token: {model.estimate_flops():e}")
    return model


def build_optimizer(args, model, plan):
    betas = None
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        if args.recipe != "2026-01":
            raise ConfigError(f"--adam-beta1/--adam-beta2 set the shared AdamW betas of recipe 2026-01; recipe {args.recipe} "
                              "sets betas per parameter group: drop them or pass --recipe=2026-01")
        betas = (0.8 if args.adam_beta1 is None else args.adam_beta1, 0.95 if args.adam_beta2 is None else args.adam_beta2)
    scale = plan.batch_lr_scale
    return model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * scale, embedding_lr=args.embedding_lr * scale, matrix_lr=args.matrix_lr * scale,
        weight_decay=plan.weight_decay, adam_betas=betas, scalar_lr=args.scalar_lr * scale, recipe=args.recipe,
        muon_eq=args.muon_eq, muon_plus=args.muon_plus,
    )


# -----------------------------------------------------------------------------
# Resume


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint's meta as loop_state."""
    step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0  # EMA of the train loss, not yet debiased
    total_training_time: float = 0.0  # seconds, excluding the first 10 steps (compilation)
    core_metric: float | None = None  # the latest CORE evaluation
    wall_time: float = 0.0  # seconds of every process of this run up to the last save (resumes add up)


def resume(args, checkpoint_dir, model, runtime):
    """The checkpoint of --resume-from-step into the model (before compiling it): (loop state, this rank's data position)."""
    meta, loop, loader_states = load_resumable(checkpoint_dir, args.resume_from_step, model, LoopState, runtime)
    # the loader's position indexes that dataset's files; runs from before --dataset read FineWeb-Edu
    trained_on = meta.get("user_config", {}).get("dataset", "fineweb")
    if trained_on != args.dataset:
        raise ConfigError(f"the checkpoint at step {args.resume_from_step} was trained on {trained_on}, not {args.dataset}: "
                          f"resume with --dataset {trained_on}")
    loop.step = args.resume_from_step
    # on another number of ranks the loader starts from rank 0's position and resumes approximately, as upstream's
    return loop, loader_states[runtime.rank] if len(loader_states) == runtime.world_size else loader_states[0]


# -----------------------------------------------------------------------------
# What happens between steps: evaluate, sample, save


def evaluate_val_bpb(model, tokenizer, args, plan, token_bytes, device):
    model.eval()
    val_loader = tokenizing_distributed_data_loader_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="val", device=device)
    with disable_fp8(model):  # evaluations and samples of an fp8 run compute in the compute dtype
        val_bpb = evaluate_bpb(model, val_loader, plan.eval_steps, token_bytes)
    model.train()
    return val_bpb


def print_samples(model, tokenizer):
    """Greedy continuations of a few fixed prompts: a quick look at what the model knows."""
    model.eval()
    with disable_fp8(model):
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer(prompt, prepend="<|bos|>")
            sample = list(model.generate(tokens, max_tokens=16, temperature=0))
            print0(tokenizer.decode(tokens + sample))
    model.train()


def save(checkpoint_dir, model, optimizer, loop, loader_state, args, user_config, plan, runtime):
    """A checkpoint to resume from (nanochat/resume.py), with the keys upstream's base_train meta has."""
    save_resumable(checkpoint_dir, loop.step, model, optimizer, loop, loader_state, runtime, keep=args.keep_checkpoints,
                   val_bpb=loop.val_bpb, user_config=user_config, device_batch_size=args.device_batch_size,
                   max_seq_len=args.max_seq_len, total_batch_size=plan.total_batch_size)


def resolve_core_metric_every(args, device_type):
    """
    Upstream's CORE cadence on CUDA, off on CPU/MPS unless asked for. A run that asks for CORE
    fails at start, not hours later, when the CORE evaluation cannot be imported, has no eval
    bundle (find_bundle downloads it now if it can, as the first evaluation would), or is asked for
    too few examples per task for the few-shot prompts.
    """
    if args.core_metric_every is None:
        args.core_metric_every = CUDA_CORE_METRIC_EVERY if device_type == "cuda" else -1
    if args.core_metric_every > 0:
        try:
            core_eval = importlib.import_module("nanochat.core_eval")
        except ImportError as error:
            raise ConfigError(f"--core-metric-every={args.core_metric_every} needs the CORE evaluation (nanochat.core_eval), "
                              f"which cannot be imported ({error}); pass --core-metric-every=-1") from None
        bundle_dir, _ = core_eval.find_bundle()
        core_eval.check_fewshot_fits(core_eval.read_bundle(bundle_dir), args.core_metric_max_per_task)


def evaluate_core_metric(model, tokenizer, device, args):
    """The CORE metric on the uncompiled model (its prompts have every length): {core_metric, label, ...}."""
    from nanochat.core_eval import evaluate_core

    model.eval()
    with disable_fp8(model):
        result = evaluate_core(model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
    model.train()
    return result


def set_schedules(optimizer, step, plan, args):
    """The recipe's schedules: every group's LR; Muon's momentum and weight decay. Returns the LR multiplier."""
    num_iterations = plan.num_iterations
    warmup_ratio = args.warmup_ratio or args.warmup_steps / num_iterations
    lrm = warmup_warmdown_lr(step, num_iterations, warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    momentum = (muon_momentum(step) if args.recipe == "2026-01"
                else muon_momentum_2026_07(step, num_iterations, args.warmdown_ratio))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = plan.weight_decay * weight_decay_factor(step, num_iterations, args.recipe)
    return lrm


def write_report(user_config, model, plan, loop, mfu, peak_memory_mib, runtime, args, core_label):
    total_flops = plan.flops_per_token * plan.total_tokens
    get_report().log(section="Base model training", data=[
        user_config,
        {
            "Number of parameters": model.num_scaling_params()["total"],
            "Number of FLOPs per token": f"{plan.flops_per_token:e}",
            "Calculated number of iterations": plan.num_iterations,
            "Number of training tokens": plan.total_tokens,
            "Tokens : Scaling params ratio": plan.total_tokens / plan.num_scaling_params,
            "Recipe": args.recipe,
            "DDP world size": runtime.world_size,
            "Attention": runtime.attention,
            "warmup_steps": args.warmup_steps,
            "warmup_ratio": args.warmup_ratio,
            "warmdown_ratio": args.warmdown_ratio,
            "final_lr_frac": args.final_lr_frac,
        },
        {
            "Minimum validation bpb": loop.min_val_bpb if loop.min_val_bpb != float("inf") else None,
            "Final validation bpb": loop.val_bpb,
            "CORE metric estimate": loop.core_metric,
            "MFU %": f"{mfu:.2f}%",
            "Total training flops": f"{total_flops:e}",
            "Total training time": f"{loop.total_training_time / 60:.2f}m",
            "Peak memory usage": f"{peak_memory_mib:.2f}MiB",
        },
        # which tasks the CORE estimate covers, e.g. a partial offline reconstruction of the eval bundle
        {"CORE tasks": core_label} if core_label else None,
    ])


def main(argv=None):
    process_start = time.time()
    args = parse_args(argv)
    print_banner()
    print0(f"Pretraining data: {use_dataset(args.dataset).title}")
    runtime = setup_runtime(args)
    if args.fp8:
        check_fp8_support(runtime.device)
    resolve_core_metric_every(args, runtime.device_type)
    user_config = dict(vars(args))
    device = runtime.device
    master_process = runtime.rank == 0
    wandb_run = init_wandb("nanochat", args.run, user_config, runtime.rank)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")
    orig_model = build_and_describe_model(args, vocab_size, device)  # uncompiled: saving, sampling, variable shapes
    plan = plan_training(args, orig_model, vocab_size, runtime.world_size)

    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    resuming = args.resume_from_step >= 0
    loop, loader_state = LoopState(), None
    if resuming:
        loop, loader_state = resume(args, checkpoint_dir, orig_model, runtime)
    # the histories so far (a resumed run keeps the steps before its checkpoint and redoes the rest)
    previous_summary = read_summary(checkpoint_dir) if resuming and os.path.exists(summary_path(checkpoint_dir)) else None
    history = history_before(previous_summary, loop.step)
    core_label = (previous_summary or {}).get("core_label") if history["core_metric"] else None
    wall_time_before = loop.wall_time
    if args.fp8:  # after the resume (checkpoints hold plain weights), before compiling
        converted, num_linear = convert_to_fp8(orig_model, args.fp8_recipe)
        print0(f"fp8 training ({args.fp8_recipe} scaling): {converted} of {num_linear} Linear layers converted; "
               f"the others (too small for fp8) stay in {str(COMPUTE_DTYPE).removeprefix('torch.')}")
    model = torch.compile(orig_model, dynamic=False) if compile_enabled(runtime.device_type) else orig_model
    optimizer = build_optimizer(args, orig_model, plan)
    if resuming:
        load_resumable_optimizer(optimizer, checkpoint_dir, args.resume_from_step, runtime)
    scaler = torch.amp.GradScaler(runtime.device_type) if COMPUTE_DTYPE == torch.float16 else None  # fp16 only

    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device, resume_state_dict=loader_state)
    x, y, next_loader_state = next(train_loader)  # prefetch
    consumed_loader_state = loader_state  # position after the last batch actually trained on
    first_step = loop.step  # of this process: setup garbage is collected after it
    mfu = 0.0
    num_iterations = plan.num_iterations

    while True:
        step = loop.step
        last_step = step == num_iterations
        flops_so_far = plan.flops_per_token * plan.total_batch_size * step

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            loop.val_bpb = evaluate_val_bpb(model, tokenizer, args, plan, token_bytes, device)
            print0(f"Step {step:05d} | Validation bpb: {loop.val_bpb:.6f}")
            loop.min_val_bpb = min(loop.min_val_bpb, loop.val_bpb)
            wandb_run.log({"step": step, "total_training_flops": flops_so_far,
                           "total_training_time": loop.total_training_time, "val/bpb": loop.val_bpb})
            history["val_bpb"].append({"step": step, "val_bpb": loop.val_bpb})

        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            core = evaluate_core_metric(orig_model, tokenizer, device, args)
            loop.core_metric, core_label = core["core_metric"], core["label"]
            print0(f"Step {step:05d} | CORE metric: {loop.core_metric:.4f}")
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "core_metric": loop.core_metric,
                           "centered_results": core["centered_results"]})
            history["core_metric"].append({"step": step, "core_metric": loop.core_metric, "num_tasks": core["num_tasks"]})

        if master_process and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            print_samples(orig_model, tokenizer)

        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0):
            loop.wall_time = wall_time_before + time.time() - process_start
            save(checkpoint_dir, orig_model, optimizer, loop, consumed_loader_state,
                                     args, user_config, plan, runtime)
            if master_process:
                write_summary(checkpoint_dir, base_run_summary(args, orig_model, plan, loop, history, runtime, mfu, 0.0,
                                                                completed=False, core_label=core_label))

        if last_step:
            break

        # One optimizer step: grad_accum_steps micro-batches, then the update
        synchronize(device)
        t0 = time.time()
        for _ in range(plan.grad_accum_steps):
            loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / plan.grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            consumed_loader_state = next_loader_state
            x, y, next_loader_state = next(train_loader)  # prefetch while the GPU works
        lrm = set_schedules(optimizer, step, plan, args)
        update_weights(model, optimizer, scaler, runtime.ddp)
        train_loss_f = train_loss.item()
        synchronize(device)
        dt = time.time() - t0

        # Logging
        ema_beta = 0.9
        loop.smooth_train_loss = ema_beta * loop.smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_loss = loop.smooth_train_loss / (1 - ema_beta ** (step + 1))
        pct_done = 100 * step / num_iterations
        tok_per_sec = int(plan.total_batch_size / dt)
        mfu = 100 * plan.flops_per_token * plan.total_batch_size / dt / (runtime.peak_flops * runtime.world_size)
        if step > 10:
            loop.total_training_time += dt  # the first steps include compilation
        steps_timed = max(step - 10, 1)
        eta = f"{(loop.total_training_time / steps_timed) * (num_iterations - step) / 60:.1f}m" if step > 10 else "n/a"
        epoch = next_loader_state["epoch"]
        attention = f" | attention: {runtime.attention}" if step == first_step else ""  # which kernel this run got
        print0(f"step {step:05d}/{num_iterations:05d} ({pct_done:.2f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {epoch} | "
               f"total time: {loop.total_training_time / 60:.2f}m | eta: {eta}{attention}")
        history["train_loss"].append({"step": step, "loss": round(debiased_loss, 6)})
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "total_training_time": loop.total_training_time,
                           "train/loss": debiased_loss, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu, "train/epoch": epoch})

        manage_garbage_collection(step, first_step)
        loop.step += 1

    peak_memory_mib = torch.cuda.max_memory_allocated() / 1024**2 if runtime.device_type == "cuda" else 0.0
    print0(f"Peak memory usage: {peak_memory_mib:.2f}MiB")
    print0(f"Total training time: {loop.total_training_time / 60:.2f}m")
    if loop.min_val_bpb != float("inf"):  # some evaluation ran
        print0(f"Minimum validation bpb: {loop.min_val_bpb:.6f}")
    write_report(user_config, orig_model, plan, loop, mfu, peak_memory_mib, runtime, args, core_label)
    if master_process:
        loop.wall_time = wall_time_before + time.time() - process_start
        write_summary(checkpoint_dir, base_run_summary(args, orig_model, plan, loop, history, runtime, mfu, peak_memory_mib,
                                                        completed=True, core_label=core_label))
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "base_train")

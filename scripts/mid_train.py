"""
Midtraining: teach a pretrained base model the conversation format (special tokens), multiple-
choice answers, calculator tool use and spelling, on a mixture of chat data packed best-fit into
full rows (one pass by default). README.md ("Phases") lists the mixture and the schedule.

Run it:
    python -m scripts.mid_train                                                 # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=mid
    python -m scripts.mid_train --device-type=cpu --max-seq-len=256 --device-batch-size=16 \
        --total-batch-size=8192 --eval-every=50 --eval-tokens=65536 --num-iterations=100   # CPU
    python -m scripts.mid_train ... --save-every=50 --resume-from-step=50         # continue a run

Reads  $NANOCHAT_BASE_DIR/base_checkpoints/<model-tag>/, tokenizer/, task_data/,
       identity_conversations.jsonl (else a small offline identity set, labelled), words_alpha.txt.
Writes $NANOCHAT_BASE_DIR/mid_checkpoints/<model-tag or d<depth>>/{model,meta,optim}_<step>.* (the full
model config and every rank's optimizer shard) and the "Midtraining" report section.
"""

import os
import sys

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

from nanochat.precision import apply_dtype_flag, check_dtype_flag  # noqa: E402

apply_dtype_flag(sys.argv[1:])  # -d/--dtype sets NANOCHAT_DTYPE before nanochat.common fixes the compute dtype

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.chat_data import loader_state_for_rank, packed_conversation_batches
from nanochat.common import (
    COMPUTE_DTYPE, ConfigError, compile_enabled, compute_cleanup, get_base_dir, parse_flags, print0, print_banner,
    run_script,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.checkpoint_manager import load_model
from nanochat.report import get_report
from nanochat.resume import (
    check_resume_step, load_resumable, load_resumable_optimizer, save_resumable,
)
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (
    add_checkpoint_flags, add_optimizer_flags, add_source_flags, all_reduce_floats, build_post_training_optimizer,
    init_runtime, init_wandb, late_decay_lr, manage_garbage_collection, muon_momentum, phase_parser, synchronize, update_weights,
)
from tasks.gsm8k import GSM8K
from tasks.mixtures import MixturePart, load_mixture, mixture_markdown
from tasks.identity import identity_conversations
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import WORD_LIST_FILENAME, SimpleSpelling, SpellingBee


def parse_args(argv=None):
    parser = phase_parser("Midtrain a base model on chat data")
    add_source_flags(parser, "base model")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one pass over the mixture); the end of the pass stops a run either way")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per rank")
    parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    add_optimizer_flags(parser, init_lr_frac=1.0)
    parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps and at the end (-1 = off)")
    parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens of val data per bpb evaluation")
    add_checkpoint_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="log to wandb but write no checkpoint and no report")
    args = parse_flags(parser, argv)
    check_dtype_flag(args.dtype)
    return args


def training_mixture():
    return [
        MixturePart("SmolTalk train", lambda: SmolTalk(split="train"), ("HuggingFaceTB/smol-smoltalk", "default", "train")),
        MixturePart("MMLU auxiliary_train", lambda: MMLU(subset="auxiliary_train", split="train"), ("cais/mmlu", "all", "auxiliary_train")),
        MixturePart("GSM8K main train", lambda: GSM8K(subset="main", split="train"), ("openai/gsm8k", "main", "train")),
        MixturePart("identity conversations", identity_conversations, copies=2),  # two epochs of these
        MixturePart("SimpleSpelling (200K)", lambda: SimpleSpelling(size=200_000, split="train"), WORD_LIST_FILENAME),
        MixturePart("SpellingBee (80K)", lambda: SpellingBee(size=80_000, split="train"), WORD_LIST_FILENAME),
    ]


def validation_mixture():
    # test-set slices in the proportions of the training mixture
    return [
        MixturePart("SmolTalk test", lambda: SmolTalk(split="test"), ("HuggingFaceTB/smol-smoltalk", "default", "test")),
        MixturePart("MMLU all test (first 5,200)", lambda: MMLU(subset="all", split="test", stop=5200), ("cais/mmlu", "all", "test")),
        MixturePart("GSM8K main test (first 420)", lambda: GSM8K(subset="main", split="test", stop=420), ("openai/gsm8k", "main", "test")),
    ]


@dataclass
class Plan:
    tokens_per_step: int
    grad_accum_steps: int
    eval_steps: int
    flops_per_token: float


def plan_batches(args, model, world_size):
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if min(args.device_batch_size, args.max_seq_len, args.total_batch_size) < 1 or args.total_batch_size % world_tokens_per_fwdbwd:
        raise ConfigError(f"--total-batch-size={args.total_batch_size} must be a positive multiple of device_batch_size * "
                          f"max_seq_len * world_size = {args.device_batch_size} * {args.max_seq_len} * {world_size} = "
                          f"{world_tokens_per_fwdbwd}")
    eval_steps = args.eval_tokens // world_tokens_per_fwdbwd
    if args.eval_every > 0 and eval_steps == 0:
        raise ConfigError(f"--eval-tokens={args.eval_tokens} is less than one evaluation batch ({world_tokens_per_fwdbwd} tokens); "
                          "raise it or pass --eval-every=-1")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {args.total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    return Plan(args.total_batch_size, grad_accum_steps, eval_steps, model.estimate_flops())


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint's meta as loop_state."""
    step: int = 0
    progress: float = 0.0  # fraction of the run done before this step (of the data, or of --num-iterations)
    val_bpb: float | None = None
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0  # EMA of the train loss, not yet debiased
    total_training_time: float = 0.0  # seconds, excluding the first 10 steps (compilation)


def evaluate_val_bpb(model, tokenizer, val_dataset, args, plan, token_bytes, device):
    model.eval()
    batches = packed_conversation_batches(val_dataset, tokenizer, args.device_batch_size, args.max_seq_len, device=device)
    val_bpb = evaluate_bpb(model, batches, plan.eval_steps, token_bytes)
    model.train()
    return val_bpb


def main(argv=None):
    args = parse_args(argv)
    user_config = dict(vars(args))
    print_banner()
    runtime = init_runtime(args.device_type)
    device = runtime.device
    wandb_run = init_wandb("nanochat-mid", args.run, user_config, runtime.rank)

    orig_model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag,
                                                 step=args.model_step)
    pretrain_batch_size = base_meta.get("device_batch_size")
    if pretrain_batch_size is not None and args.device_batch_size > pretrain_batch_size:
        print0(f"FOOTGUN WARNING: base model training used device_batch_size {pretrain_batch_size}, "
               "did you pass in a good --device-batch-size to this script?")
    plan = plan_batches(args, orig_model, runtime.world_size)
    checkpoint_dir = os.path.join(get_base_dir(), "mid_checkpoints", args.model_tag or f"d{orig_model.config.n_layer}")
    resuming = args.resume_from_step >= 0
    if resuming:
        check_resume_step(checkpoint_dir, args.resume_from_step)  # before the (slower) data loading
    train_mixture = load_mixture("Training mixture", training_mixture())
    val_mixture = load_mixture("Validation mixture", validation_mixture())
    token_bytes = get_token_bytes(device=device)

    loop, loader_state = LoopState(), None
    if resuming:
        _, loop, loader_states = load_resumable(checkpoint_dir, args.resume_from_step, orig_model, LoopState, runtime)
        loader_state = loader_state_for_rank(loader_states, runtime.rank, runtime.world_size)
    model = torch.compile(orig_model, dynamic=False) if compile_enabled(runtime.device_type) else orig_model
    optimizer = build_post_training_optimizer(args, orig_model)
    if resuming:
        load_resumable_optimizer(optimizer, checkpoint_dir, args.resume_from_step, runtime)
    scaler = torch.amp.GradScaler(runtime.device_type) if COMPUTE_DTYPE == torch.float16 else None  # fp16 only

    train_size = len(train_mixture.task)
    train_loader = packed_conversation_batches(train_mixture.task, tokenizer, args.device_batch_size, args.max_seq_len,
                                               device=device, resume_state=loader_state)
    x, y, next_loader_state = next(train_loader)  # prefetch
    consumed_loader_state = loader_state  # after the last batch actually trained on
    first_step = loop.step
    mfu = 0.0

    while True:
        step = loop.step
        # The run ends at --num-iterations or when the batch in hand crosses the end of the data;
        # every rank must agree, and on the progress that sets the LR.
        consumed = consumed_loader_state["consumed"] / train_size if consumed_loader_state else 0.0
        done = next_loader_state["consumed"] >= train_size or 0 < args.num_iterations <= step
        progress = step / args.num_iterations if args.num_iterations > 0 else consumed
        done, loop.progress = all_reduce_floats([float(done), progress], runtime, op=dist.ReduceOp.MAX)
        last_step = bool(done)

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            loop.val_bpb = evaluate_val_bpb(model, tokenizer, val_mixture.task, args, plan, token_bytes, device)
            print0(f"Step {step:05d} | Validation bpb: {loop.val_bpb:.4f}")
            loop.min_val_bpb = min(loop.min_val_bpb, loop.val_bpb)
            wandb_run.log({"step": step, "total_training_flops": plan.flops_per_token * plan.tokens_per_step * step,
                           "total_training_time": loop.total_training_time, "val/bpb": loop.val_bpb})

        periodic_save = args.save_every > 0 and step > 0 and step != args.resume_from_step and step % args.save_every == 0
        if not args.dry_run and (last_step or periodic_save):
            save_resumable(checkpoint_dir, step, orig_model, optimizer, loop, consumed_loader_state, runtime,
                           keep=args.keep_checkpoints, val_bpb=loop.val_bpb, user_config=user_config,
                           device_batch_size=args.device_batch_size, max_seq_len=args.max_seq_len,
                           total_batch_size=args.total_batch_size)
        if last_step:
            break

        synchronize(device)
        t0 = time.time()
        for _ in range(plan.grad_accum_steps):
            loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / plan.grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            consumed_loader_state = next_loader_state
            x, y, next_loader_state = next(train_loader)  # prefetch while the device works
        lrm = late_decay_lr(loop.progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        update_weights(model, optimizer, scaler, runtime.ddp)
        train_loss_f = train_loss.item()
        synchronize(device)
        dt = time.time() - t0

        loop.step += 1
        ema_beta = 0.9
        loop.smooth_train_loss = ema_beta * loop.smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_loss = loop.smooth_train_loss / (1 - ema_beta ** loop.step)
        tok_per_sec = int(plan.tokens_per_step / dt)
        mfu = 100 * plan.flops_per_token * plan.tokens_per_step / dt / (runtime.peak_flops * runtime.world_size)
        if loop.step > 10:
            loop.total_training_time += dt  # the first steps include compilation
        print0(f"step {loop.step:05d} ({100 * loop.progress:.2f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {next_loader_state['epoch']} | "
               f"total time: {loop.total_training_time / 60:.2f}m")
        if loop.step % 10 == 0:
            wandb_run.log({"step": loop.step, "total_training_flops": plan.flops_per_token * plan.tokens_per_step * loop.step,
                           "total_training_time": loop.total_training_time, "train/loss": debiased_loss, "train/lrm": lrm,
                           "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        manage_garbage_collection(step, first_step)

    peak_memory_mib = torch.cuda.max_memory_allocated() / 1024**2 if runtime.device_type == "cuda" else 0.0
    print0(f"Peak memory usage: {peak_memory_mib:.2f}MiB")
    print0(f"Total training time: {loop.total_training_time / 60:.2f}m")
    if loop.min_val_bpb != float("inf"):
        print0(f"Minimum validation bpb: {loop.min_val_bpb:.4f}")
    if not args.dry_run:
        get_report().log(section="Midtraining", data=[
            user_config,
            {"Number of iterations": loop.step, "DDP world size": runtime.world_size},
            {"Minimum validation bpb": loop.min_val_bpb if loop.min_val_bpb != float("inf") else None,
             "MFU %": f"{mfu:.2f}%"},
            mixture_markdown("Training mixture", train_mixture),
            mixture_markdown("Validation mixture", val_mixture),
        ])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_script(main, "mid_train")
